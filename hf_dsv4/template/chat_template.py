"""The DeepSeek-V4 chat template for Hugging Face tokenizers.

`CHAT_TEMPLATE` is a Jinja template that renders exactly what `encode_messages` renders, so
`tokenizer.apply_chat_template(messages, tools=..., thinking_mode=..., drop_thinking=..., reasoning_effort=...)`
works with the stock stack (TRL's SFTTrainer included). Each assistant message's trainable span is wrapped in
`{% generation %}` tags, so `return_assistant_tokens_mask=True` (assistant-only loss) masks exactly the spans
that `render_segments` marks. Tool-call arguments may be dicts or JSON-object strings (as datasets store them);
the template parses the strings itself, because Jinja has no `json.loads`.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["CHAT_TEMPLATE", "install_chat_template"]

CHAT_TEMPLATE: str = files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def install_chat_template(tokenizer):
    """Set `tokenizer.chat_template` to the DeepSeek-V4 template and return the tokenizer (saved with it)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
