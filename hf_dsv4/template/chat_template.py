"""The DeepSeek-V4 chat template for Hugging Face tokenizers.

`CHAT_TEMPLATE` is a Jinja template that renders exactly what `encode_messages` renders, so
`tokenizer.apply_chat_template(messages, tools=..., thinking_mode=..., drop_thinking=..., reasoning_effort=...,
effort_profile=...)` works with the stock stack (TRL's SFTTrainer included). Each assistant message's trainable span is wrapped in
`{% generation %}` tags, so `return_assistant_tokens_mask=True` (assistant-only loss) masks exactly the spans
that `render_segments` marks. Tool-call arguments may be dicts or JSON-object strings (as datasets store them);
the template parses the strings itself, because Jinja has no `json.loads`.
"""

from __future__ import annotations

from importlib.resources import files

from .encoder import ChatFormatError
from .tokens import DEFAULT_EFFORT_PROFILE, EFFORT_PROFILES

__all__ = ["CHAT_TEMPLATE", "chat_template", "install_chat_template"]

CHAT_TEMPLATE: str = files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")
_DEFAULT_LINE = f'{{%- set DEFAULT_EFFORT_PROFILE = "{DEFAULT_EFFORT_PROFILE}" -%}}'  # once in the template (tested)


def chat_template(effort_profile: str = DEFAULT_EFFORT_PROFILE) -> str:
    """The DeepSeek-V4 Jinja chat template.

    Args:
        effort_profile: the reasoning-effort block it renders unless a call passes `effort_profile` ("0424" or
            "0731").

    Returns:
        The template text.

    Raises:
        ChatFormatError: an unknown `effort_profile`.
    """
    if effort_profile not in EFFORT_PROFILES:
        raise ChatFormatError(f"effort_profile must be one of {tuple(EFFORT_PROFILES)}, got {effort_profile!r}")
    return CHAT_TEMPLATE.replace(_DEFAULT_LINE, _DEFAULT_LINE.replace(DEFAULT_EFFORT_PROFILE, effort_profile))


def install_chat_template(tokenizer, effort_profile: str = DEFAULT_EFFORT_PROFILE):
    """Set `tokenizer.chat_template` to the DeepSeek-V4 template for `effort_profile` ("0424": DeepSeek-V4-Flash /
    -Pro as first released; "0731": DeepSeek-V4-Flash-0731); the template is saved with the tokenizer.

    Args:
        tokenizer: any Hugging Face tokenizer with DeepSeek-V4's special tokens.
        effort_profile: "0424" or "0731".

    Returns:
        `tokenizer`, changed in place.

    Raises:
        ChatFormatError: an unknown `effort_profile`.
    """
    tokenizer.chat_template = chat_template(effort_profile)
    return tokenizer
