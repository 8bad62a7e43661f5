"""Chat messages to prompt token ids through a chat template."""

from __future__ import annotations

from collections.abc import Mapping

# For tokenizers without a template: role-tagged turns, then the assistant's turn to fill.
BUILTIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def render_chat(tokenizer, messages: list[dict], chat_template: str | None = None,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation plus the assistant prefix; templates write BOS themselves
    (and the tools, where the template renders them)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot serve chat: use /v1/completions with token ids")
    template = chat_template or (None if getattr(tokenizer, "chat_template", None) else BUILTIN_CHAT_TEMPLATE)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, chat_template=template,
                                        tools=tools)
    # transformers 5 returns a BatchEncoding here, 4.x a plain list.
    if isinstance(ids, Mapping) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]
