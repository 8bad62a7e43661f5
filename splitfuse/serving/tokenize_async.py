"""Tokenizing off the event loop, bounded for prompts that cannot fit the model.

A long prompt tokenized on the event loop stalls every stream and /health; one far past the
model's length need not be tokenized whole to know that it does not fit."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from splitfuse.serving.chat import render_chat_text

# A first prefix of this many characters per allowed token: most prompts fit in one pass.
_CHARS_PER_TOKEN = 4
# Slack for the last word of a prefix, which the whole text may tokenize differently.
_CUT_SLACK_TOKENS = 64


class PromptTooLong(ValueError):
    """The prompt has more tokens than the model's length; a prefix of it already did."""

    def __init__(self, num_chars: int, num_tokens: int, max_model_len: int) -> None:
        self.num_chars, self.num_tokens, self.max_model_len = num_chars, num_tokens, max_model_len
        super().__init__(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt is longer: its "
            f"first {num_chars} characters alone are {num_tokens} tokens; shorten the prompt")


def encode_bounded(tokenizer, text: str, max_model_len: int, add_special_tokens: bool = True) -> list[int]:
    """Token ids of text; raises PromptTooLong once a growing prefix is certainly too long."""
    limit = max_model_len + _CUT_SLACK_TOKENS
    num_chars = _CHARS_PER_TOKEN * max_model_len
    while num_chars < len(text):
        ids = tokenizer(text[:num_chars], add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) > limit:
            raise PromptTooLong(num_chars, len(ids), max_model_len)
        num_chars *= 4  # geometric: all prefixes together cost at most a third more than the last
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


class Tokenizing:
    """A tokenizer's work for the app, run in a small thread pool."""

    def __init__(self, tokenizer, max_model_len: int, workers: int = 2) -> None:
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="splitfuse-tokenize")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def encode(self, text: str) -> list[int]:
        return await self._run(encode_bounded, self.tokenizer, text, self.max_model_len)

    async def encode_chat(self, messages: list[dict], chat_template: str | None,
                          tools: list[dict] | None = None) -> list[int]:
        """The conversation's ids; templates write BOS themselves, so no special tokens are added."""
        def render() -> list[int]:
            text = render_chat_text(self.tokenizer, messages, chat_template, tools)
            return encode_bounded(self.tokenizer, text, self.max_model_len, add_special_tokens=False)

        return await self._run(render)

    async def decode(self, ids: list[int]) -> str:
        return await self._run(self.tokenizer.decode, ids)
