"""The reasoning-effort block of each DeepSeek-V4 release ("effort profile"): 0424 (DeepSeek-V4-Flash / -Pro as first
released) and 0731 (DeepSeek-V4-Flash-0731), in the encoder, the Jinja template and tokenization, and the detection
of a checkpoint's profile from its encoder file."""

from __future__ import annotations

import hashlib

import pytest
from jinja2 import TemplateError

from hf_dsv4.template import (
    ChatFormatError,
    chat_template,
    detect_effort_profile,
    encode_messages,
    install_chat_template,
    tokenize_conversation,
)
from hf_dsv4.template import tokens as T
from hf_dsv4.template.chat_template import CHAT_TEMPLATE
from hf_dsv4.testing import tiny_tokenizer

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi"}],
    "system+user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "system+tools": [{"role": "system", "content": "", "tools": [TOOL]}, {"role": "user", "content": "Hi"}],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
        {"role": "user", "content": "Bye"},
    ],
}
# what each profile renders after BOS in thinking mode, per effort (None: the profile's default)
EXPECTED = {
    "0424": {None: "", "high": "", "max": T.REASONING_EFFORT_MAX_PREFIX},
    "0731": {None: "", "low": "", "high": T.REASONING_EFFORT_MAX_PREFIX, "max": T.REASONING_EFFORT_BEYOND_MAX_PREFIX},
}


def test_the_0731_max_text_is_the_one_the_serving_engines_render():
    """Taken from SGLang's, vLLM's and smg's 0731 encoders, which agree byte for byte (pinned by its digest); its
    "high" is the April "max" text."""
    text = T.REASONING_EFFORT_BEYOND_MAX_PREFIX
    assert text.startswith("Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n")
    assert text.endswith("no assumption remains unchecked and no error remains undiscovered.\n\n")
    assert len(text) == 526 and hashlib.sha256(text.encode()).hexdigest()[:16] == "53fb31b8392ec5b4"


@pytest.fixture(scope="module")
def templates() -> dict:
    """A tokenizer per profile, with that profile as its template's default."""
    return {profile: install_chat_template(tiny_tokenizer(), profile) for profile in ("0424", "0731")}


@pytest.mark.parametrize("profile", ["0424", "0731"])
@pytest.mark.parametrize("effort", [None, "low", "high", "max"])
@pytest.mark.parametrize("mode", ["thinking", "chat"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_each_profile_renders_its_effort_text_after_bos_in_thinking_mode_only(templates, profile, effort, mode, name):
    messages = CONVERSATIONS[name]
    if effort not in EXPECTED[profile]:
        with pytest.raises(
            ChatFormatError, match=rf"reasoning_effort must be one of .* {profile} effort profile, got 'low'"
        ):
            encode_messages(messages, mode, reasoning_effort=effort, effort_profile=profile)
        return
    text = encode_messages(messages, mode, reasoning_effort=effort, effort_profile=profile)
    plain = encode_messages(messages, mode)  # the April format, no effort: the rest of the prompt
    prefix = EXPECTED[profile][effort] if mode == "thinking" else ""
    assert text == T.BOS + prefix + plain[len(T.BOS) :]
    tok = templates[profile]  # the profile as the template's default
    kwargs = {} if effort is None else {"reasoning_effort": effort}
    assert (
        tok.apply_chat_template(messages, tokenize=False, thinking_mode=mode, add_generation_prompt=True, **kwargs)
        == text
    )
    other = templates["0731" if profile == "0424" else "0424"]
    rendered = other.apply_chat_template(
        messages, tokenize=False, thinking_mode=mode, add_generation_prompt=True, effort_profile=profile, **kwargs
    )  # the profile passed with the call wins over the template's default
    assert rendered == text


@pytest.mark.parametrize("profile", ["0424", "0731"])
def test_tokenization_under_a_profile_gives_the_ids_and_mask_of_its_template(templates, profile):
    tok = templates[profile]
    messages = [*CONVERSATIONS["system+user"], {"role": "assistant", "content": "Hello", "reasoning_content": "r"}]
    sample = tokenize_conversation(tok, messages, reasoning_effort="max", effort_profile=profile)
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, reasoning_effort="max"
    )
    assert sample["input_ids"] == out["input_ids"]
    assert [label != -100 for label in sample["labels"]] == [bool(m) for m in out["assistant_masks"]]
    text = tok.decode(sample["input_ids"])
    assert (T.REASONING_EFFORT_BEYOND_MAX_PREFIX in text) == (profile == "0731")


def test_an_unknown_profile_or_effort_is_refused_everywhere_naming_it():
    messages = CONVERSATIONS["user"]
    with pytest.raises(ChatFormatError, match="effort_profile must be one of .*got '0901'"):
        encode_messages(messages, effort_profile="0901")
    with pytest.raises(ChatFormatError, match="effort_profile must be one of"):
        install_chat_template(tiny_tokenizer(), "0901")
    with pytest.raises(ChatFormatError, match="under the 0731 effort profile, got 'medium'"):
        tokenize_conversation(tiny_tokenizer(), messages, reasoning_effort="medium", effort_profile="0731")
    tok = install_chat_template(tiny_tokenizer())
    with pytest.raises(TemplateError, match="effort_profile must be .*got 0901"):
        tok.apply_chat_template(messages, tokenize=False, effort_profile="0901")
    with pytest.raises(TemplateError, match="under the 0424 effort profile, got low"):
        tok.apply_chat_template(messages, tokenize=False, reasoning_effort="low")


def test_the_template_default_profile_is_set_in_one_place():
    line = '{%- set DEFAULT_EFFORT_PROFILE = "0424" -%}'
    assert CHAT_TEMPLATE.count(line) == 1 and chat_template() == CHAT_TEMPLATE
    assert chat_template("0731").count(line.replace("0424", "0731")) == 1


# ------------------------------------------------------------------------------------------------- detection

APRIL = """
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\\n"
)
def encode_messages(messages, thinking_mode, reasoning_effort=None):
    assert reasoning_effort in ["max", None, "high"]
"""
JULY = """
from typing import Dict
REASONING_EFFORT_PROMPTS: Dict[str, str] = {
    "low": "",
    "high": ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\\n"),
    "max": ("Reasoning Effort: Beyond maximum \\u2014 exhaustive, relentless, and uncompromising.\\n"),
}
DEFAULT_REASONING_EFFORT = "low"
"""


def _checkpoint(tmp_path, encoder: str | None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text("{}")
    if encoder is not None:
        (tmp_path / "encoding").mkdir()
        (tmp_path / "encoding" / "encoding_dsv4.py").write_text(encoder)
    return tmp_path


def test_the_profile_is_read_from_the_checkpoints_encoder_without_running_it(tmp_path):
    assert detect_effort_profile(_checkpoint(tmp_path / "april", APRIL)) == "0424"
    assert detect_effort_profile(_checkpoint(tmp_path / "july", JULY)) == "0731"
    assert detect_effort_profile(_checkpoint(tmp_path / "none", None)) == "0424"  # no encoder shipped
    ran = tmp_path / "ran"
    hostile = JULY + f"open({str(ran)!r}, 'w').write('x')\n"  # a statement that would leave a trace if executed
    assert detect_effort_profile(_checkpoint(tmp_path / "hostile", hostile)) == "0731" and not ran.exists()


@pytest.mark.parametrize(
    "encoder, needle",
    [
        ("def broken(:\n", "not Python"),
        ("X = 1\n", "neither the April encoder"),
        (JULY.replace('"low"\n', '"high"\n'), "neither the April encoder"),  # 0731 prompts, another default
    ],
)
def test_an_encoder_of_another_shape_fails_naming_the_file(tmp_path, encoder, needle):
    folder = _checkpoint(tmp_path, encoder)
    with pytest.raises(ChatFormatError, match=rf"{folder / 'encoding' / 'encoding_dsv4.py'}.*{needle}"):
        detect_effort_profile(folder)
