"""Chat messages to prompt text through a chat template (tokenized by tokenize_async.py)."""

from __future__ import annotations

# For tokenizers without a template: role-tagged turns, then the assistant's turn to fill.
BUILTIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def render_chat_text(tokenizer, messages: list[dict], chat_template: str | None = None,
                     tools: list[dict] | None = None) -> str:
    """The conversation plus the assistant prefix as text, special tokens written out (and the
    tools, where the template renders them)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot serve chat: use /v1/completions with token ids")
    template = chat_template or (None if getattr(tokenizer, "chat_template", None) else BUILTIN_CHAT_TEMPLATE)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=template,
                                         tools=tools)

