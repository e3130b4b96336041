"""The Jinja chat template renders exactly what the encoder renders, through `tokenizer.apply_chat_template`.

The contract: `apply_chat_template(messages, tools=tools, thinking_mode/enable_thinking, drop_thinking,
reasoning_effort, add_generation_prompt)` equals `encode_messages` of the same messages with `tools` appended to
the leading system message (created empty when missing); without a generation prompt the final message's
transition is left out; each assistant message's trainable span, and nothing else, is a generation span.
"""

from __future__ import annotations

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import load_fixture
from strategies import assistant_messages, conversations, json_argument_strings, json_values
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from hf_dsv4.template import ChatFormatError, encode_messages, render_segments
from hf_dsv4.template import tokens as T
from hf_dsv4.template.chat_template import CHAT_TEMPLATE, install_chat_template
from hf_dsv4.testing import tiny_tokenizer

_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
_SENTINEL = "\x00sentinel"
_WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}

# (keyword arguments, the thinking mode they select)
_MODE_OPTIONS = st.sampled_from(
    [
        ({}, "thinking"),
        ({"thinking_mode": "chat"}, "chat"),
        ({"thinking_mode": "thinking"}, "thinking"),
        ({"enable_thinking": False}, "chat"),
        ({"enable_thinking": True}, "thinking"),
        ({"thinking_mode": "chat", "enable_thinking": True}, "chat"),
    ]
)
_DROP_OPTIONS = st.sampled_from([({}, True), ({"drop_thinking": True}, True), ({"drop_thinking": False}, False)])
_EFFORTS = {  # per effort profile: (keyword arguments, the reasoning effort they select)
    "0424": [({}, None), ({"reasoning_effort": None}, None), ({"reasoning_effort": "high"}, "high"),
             ({"reasoning_effort": "max"}, "max")],
    "0731": [({}, None), ({"reasoning_effort": None}, None), ({"reasoning_effort": "low"}, "low"),
             ({"reasoning_effort": "high"}, "high"), ({"reasoning_effort": "max"}, "max")],
}  # fmt: skip
# the template's default profile (the installed one) or one passed with the call
_PROFILE_OPTIONS = st.sampled_from(
    [({}, "0424"), ({"effort_profile": "0424"}, "0424"), ({"effort_profile": "0731"}, "0731")]
)


@st.composite
def _options(draw) -> tuple[dict, dict]:
    """(keyword arguments for apply_chat_template, the matching encode_messages options)."""
    kwargs, options = {}, {}
    profile_kwargs, options["effort_profile"] = draw(_PROFILE_OPTIONS)
    kwargs.update(profile_kwargs)
    for strategy, name in (
        (_MODE_OPTIONS, "thinking_mode"),
        (_DROP_OPTIONS, "drop_thinking"),
        (st.sampled_from(_EFFORTS[options["effort_profile"]]), "reasoning_effort"),
    ):
        given_kwargs, value = draw(strategy)
        kwargs.update(given_kwargs)
        options[name] = value
    return kwargs, options


@pytest.fixture(scope="module")
def tok():
    return install_chat_template(tiny_tokenizer())


def _with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages the encoder sees: `tools` appended to the leading system message, created if missing."""
    if not tools:
        return messages
    if messages[0]["role"] == "system":
        return [{**messages[0], "tools": [*(messages[0].get("tools") or []), *tools]}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *messages]


def _reference(messages, tools=None, add_generation_prompt=True, **options) -> str:
    full = _with_tools(messages, tools)
    if add_generation_prompt:
        return encode_messages(full, **options)
    # A trailing system message suppresses the final message's transition (it is not an assistant turn) and adds
    # only its own text, so cutting that text off leaves the reference without the final transition.
    text = encode_messages([*full, {"role": "system", "content": _SENTINEL}], **options)
    assert text.endswith(_SENTINEL)
    return text[: -len(_SENTINEL)]


def _render(tok, messages, tools=None, add_generation_prompt=True, **kwargs) -> str:
    return tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _assistant_spans(messages, tools, **options) -> list[tuple[int, int]]:
    spans, start = [], 0
    for segment in render_segments(_with_tools(messages, tools), **options):
        if segment.message_index is not None:
            spans.append((start, start + len(segment.text)))
        start += len(segment.text)
    return spans


def _drop_none(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


# ----------------------------------------------------------------------------------------------------------
# Equality with the encoder
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_template_renders_official_fixture_byte_for_byte(tok, case):
    messages, mode, expected = load_fixture(case)
    tools = messages[0].pop("tools", None) if case == 1 else None  # case 1's tools go through the tools argument
    assert _render(tok, messages, tools=tools, thinking_mode=mode) == expected


@settings(max_examples=200, **_SETTINGS)
@given(conversations(), _options(), st.booleans())
def test_template_renders_what_the_encoder_renders(tok, conversation, options, add_generation_prompt):
    messages, tools = conversation
    kwargs, encoder_options = options
    expected = _reference(messages, tools, add_generation_prompt, **encoder_options)
    assert _render(tok, messages, tools, add_generation_prompt, **kwargs) == expected


@settings(max_examples=120, **_SETTINGS)
@given(
    st.dictionaries(st.text(max_size=5), json_values, max_size=4).flatmap(
        lambda args: st.tuples(st.just(args), json_argument_strings(st.just(args)))
    )
)
def test_json_string_arguments_render_as_the_encoder_and_as_the_same_dict(tok, arguments):
    as_dict, as_string = arguments
    rendered = []
    for value in (as_dict, as_string):
        call = {"type": "function", "function": {"name": "f", "arguments": value}}
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]
        rendered.append(_render(tok, messages, thinking_mode="chat"))
        assert rendered[-1] == encode_messages(messages, thinking_mode="chat")
    assert rendered[0] == rendered[1]


@pytest.mark.parametrize(
    "arguments",
    [
        "{}",
        " \r\n\t{ } \n",
        '{"": ""}',
        ' { "a" : [ 1 , 2.50 , { } , [ ] ] , "b" : { "c" : null } } ',
        '{"a": true, "b": false, "c": null, "d": "true", "e": "1"}',
        '{"a": 1, "b": 2, "a": 3}',  # json.loads: a repeated key keeps its first position and its last value
        '{"a": {"x": 1, "y": [1, {"z": 2, "z": "3"}], "x": 4}}',
        '{"n": NaN, "i": Infinity, "m": -Infinity, "l": [NaN, -Infinity]}',
        '{"big": 123456789012345678901234567890, "f": 1E+2, "g": -0, "h": -0.0, "e": 1e-400, "o": 1e400}',
        '{"x": 0.1, "y": 1e20, "z": 1.5e-7, "w": 100000000000000000000.0, "v": -12}',
        '{"s": "\\b\\f\\n\\r\\t\\"\\\\\\/", "t": "\\u00E9\\u00e9\\u4E2D\\u005c\\u0022"}',
        '{"k\\"ey": "v\\\\", "\\u4e2d": "\\\\"}',
        '{"pair": "\\ud83d\\ude00\\uD834\\uDD1E", "nested": ["\\ud83d\\ude00", {"\\u00e9": "\\n"}]}',
        '{"lone": "\\ud83d", "then": "\\ud83d\\u0041", "low": "\\ude00x"}',
        '{"raw": "中文😀\x7f\u2028 <｜DSML｜parameter> \\u003c"}',
        '{"inner": "{\\"a\\": 1}", "list": "[1, 2]"}',
        '{"a": -0, "b": 1e05, "c": 0e0, "d": 0.0e-0, "e": -1.25E-3}',
        '{"a": "x\\\\", "b": "\\\\\\"", "c": "\\\\u0041"}',
    ],
)
def test_json_argument_edge_cases_render_as_the_encoder(tok, arguments):
    call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert _render(tok, messages) == encode_messages(messages)


# ----------------------------------------------------------------------------------------------------------
# Options, the tools argument and the generation prompt
# ----------------------------------------------------------------------------------------------------------


def test_thinking_mode_defaults_to_thinking_and_enable_thinking_false_selects_chat(tok):
    messages = [{"role": "user", "content": "hi"}]
    assert _render(tok, messages).endswith(T.ASSISTANT + T.THINK_START)
    assert _render(tok, messages, enable_thinking=False).endswith(T.ASSISTANT + T.THINK_END)
    assert _render(tok, messages, thinking_mode="chat", enable_thinking=True).endswith(T.ASSISTANT + T.THINK_END)


def test_tools_argument_is_appended_to_the_system_message_tools(tok):
    own = {**_WEATHER_TOOL, "function": {**_WEATHER_TOOL["function"], "name": "own"}}
    messages = [{"role": "system", "content": "sys", "tools": [own]}, {"role": "user", "content": "hi"}]
    text = _render(tok, messages, tools=[_WEATHER_TOOL])
    assert text == encode_messages([{**messages[0], "tools": [own, _WEATHER_TOOL]}, messages[1]])
    assert text.index('"name": "own"') < text.index('"name": "get_weather"')


def test_tools_argument_without_a_system_message_creates_an_empty_one(tok):
    messages = [{"role": "user", "content": "hi"}]
    text = _render(tok, messages, tools=[_WEATHER_TOOL])
    assert text == encode_messages([{"role": "system", "content": "", "tools": [_WEATHER_TOOL]}, *messages])
    assert text.startswith(T.BOS + "\n\n" + T.TOOLS_HEADER)


def test_no_tools_argument_creates_no_system_message(tok):
    assert _render(tok, [{"role": "user", "content": "hi"}]) == T.BOS + T.USER + "hi" + T.ASSISTANT + T.THINK_START


@pytest.mark.parametrize(
    ("last", "mode", "transition"),
    [
        ({"role": "user", "content": "u"}, "thinking", T.ASSISTANT + T.THINK_START),
        ({"role": "user", "content": "u"}, "chat", T.ASSISTANT + T.THINK_END),
        ({"role": "developer", "content": "d"}, "thinking", T.ASSISTANT + T.THINK_START),
        ({"role": "tool", "tool_call_id": "c1", "content": "r"}, "thinking", T.ASSISTANT + T.THINK_START),
        ({"role": "user", "content": "u", "task": "query"}, "thinking", T.TASK_TOKENS["query"]),
        (
            {"role": "user", "content": "u", "task": "action"},
            "chat",
            T.ASSISTANT + T.THINK_END + T.TASK_TOKENS["action"],
        ),
        ({"role": "assistant", "content": "a"}, "thinking", ""),
        ({"role": "latest_reminder", "content": "r"}, "thinking", ""),
    ],
)
def test_without_generation_prompt_the_final_transition_is_left_out(tok, last, mode, transition):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}, last]
    with_prompt = _render(tok, messages, thinking_mode=mode)
    assert with_prompt == encode_messages(messages, thinking_mode=mode)
    assert with_prompt.endswith(transition)
    assert (
        _render(tok, messages, add_generation_prompt=False, thinking_mode=mode)
        == with_prompt[: len(with_prompt) - len(transition)]
    )


def test_tokenizer_saved_and_reloaded_keeps_the_template(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHAT_TEMPLATE
    messages, mode, expected = load_fixture(3)
    assert _render(reloaded, messages, thinking_mode=mode) == expected


# ----------------------------------------------------------------------------------------------------------
# Assistant-only loss: generation spans and token masks
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=100, **_SETTINGS)
@given(conversations(), _options())
def test_generation_spans_are_exactly_the_assistant_segments(tok, conversation, options):
    messages, tools = conversation
    kwargs, encoder_options = options
    (text,), (spans,) = render_jinja_template(
        conversations=[_drop_none(messages)],
        tools=tools,
        chat_template=CHAT_TEMPLATE,
        return_assistant_tokens_mask=True,
        add_generation_prompt=True,
        **kwargs,
    )
    expected_spans = _assistant_spans(messages, tools, **encoder_options)
    assert [tuple(span) for span in spans] == expected_spans
    segments = render_segments(_with_tools(messages, tools), **encoder_options)
    assert "".join(text[a:b] for a, b in spans) == "".join(s.text for s in segments if s.message_index is not None)


@settings(max_examples=60, **_SETTINGS)
@given(conversations(), _options())
def test_assistant_token_mask_marks_the_tokens_overlapping_assistant_segments(tok, conversation, options):
    messages, tools = conversation
    kwargs, encoder_options = options
    out = tok.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    text = encode_messages(_with_tools(messages, tools), **encoder_options)
    encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert out["input_ids"] == encoding["input_ids"]
    spans = _assistant_spans(messages, tools, **encoder_options)
    expected = [int(any(end > a and start < b for a, b in spans)) for start, end in encoding["offset_mapping"]]
    assert out["assistant_masks"] == expected


def test_assistant_token_mask_covers_reasoning_content_calls_and_eos_only(tok):
    messages, mode, expected = load_fixture(2)
    out = tok.apply_chat_template(messages, thinking_mode=mode, return_dict=True, return_assistant_tokens_mask=True)
    masked = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    last = messages[-1]
    assert (
        masked
        == "Hi there! How can I help you?" + T.EOS + last["reasoning_content"] + T.THINK_END + last["content"] + T.EOS
    )


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------

_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "tools", "options", "needle"),
    [
        (
            [{"role": "user", "content": "q"}, {"role": "assistant"}, {"role": "bot", "content": "x"}],
            None,
            {},
            "message 2",
        ),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], None, {}, "message 1"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], [_WEATHER_TOOL], {}, "message 1"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"}],
            None,
            {},
            "message 2",
        ),
        (
            [{"role": "assistant", "tool_calls": [_CALL]}, {"role": "tool", "tool_call_id": "nope", "content": "r"}],
            None,
            {},
            "message 1",
        ),
        ([{"role": "developer", "content": ""}], None, {}, "message 0"),
        ([{"role": "user", "content": "q", "task": "poem"}], None, {}, "message 0"),
        ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], None, {}, "message 0"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}],
            None,
            {},
            "message 1",
        ),
        ([{"role": "user", "content": "q"}], None, {"reasoning_effort": "low"}, "reasoning_effort"),
        ([{"role": "user", "content": "q"}], None, {"thinking_mode": "fast"}, "thinking_mode"),
    ],
)
def test_bad_input_raises_template_error_naming_the_problem(tok, messages, tools, options, needle):
    with pytest.raises(ChatFormatError):
        encode_messages(_with_tools(messages, tools), **options)
    with pytest.raises(jinja2.exceptions.TemplateError, match=needle):
        _render(tok, messages, tools, **options)


@pytest.mark.parametrize(
    "arguments",
    [
        "",
        "   ",
        "[1, 2]",
        '"text"',
        "1",
        "null",
        "{",
        '{"a": 1',
        '{"a": 1,}',
        '{"a" 1}',
        '{"a": 1} x',
        '{"a": 1}{}',
        "{'a': 1}",
        "{a: 1}",
        '{"a": 01}',
        '{"a": 1.}',
        '{"a": .5}',
        '{"a": +1}',
        '{"a": -}',
        '{"a": 1e}',
        '{"a": 1.5e+}',
        '{"a": 1-2}',
        '{"a": tru}',
        '{"a": truex}',
        '{"a": nan}',
        '{"a": [1, 2}',
        '{"a": [1,]}',
        '{"a": "\\x"}',
        '{"a": "\\u12"}',
        '{"a": "\\u12g4"}',
        '{"a": "b\nc"}',
        '{"a": "tab\there"}',
        '{"a": "unterminated}',
        '{"a": "end\\"}',
        '\ufeff{"a": 1}',
        '{"a": "x"  "b": 1}',
        '{"a": 1}\\',
        '{"a": 1\u3000}',
        '{"a": "\x01"}',
        '{"a": [1 2]}',
        '{"a" "b"}',
        "{,}",
        '{"a": 1,, "b": 2}',
        '{"a": }',
        "{: 1}",
        '{"a": "\\uD83D\\u"}',
        '{"a": -01}',
        '{"a": 2.}',
        '{"a": -.5}',
        '{"a": --1}',
        '{"a": 1.5.5}',
        '{"a": 1e5e5}',
        '{"a": \u0663}',
        '{"a": 0x10}',
        '{"a": 1_000}',
        '{"a": Infinityx}',
        '{"a": -NaN}',
        '{"a": infinity}',
        '{"a": True}',
    ],
)
def test_arguments_that_are_not_a_json_object_raise_naming_the_message(tok, arguments):
    call = {"type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(ChatFormatError):
        encode_messages(messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match=r"message 1: tool_calls\[0\] \(f\)"):
        _render(tok, messages)


@settings(max_examples=30, **_SETTINGS)
@given(assistant_messages(calls=True), _options())
def test_assistant_message_renders_as_the_encoder_after_a_user_turn(tok, message, options):
    kwargs, encoder_options = options
    messages = [{"role": "user", "content": "q"}, message]
    assert _render(tok, messages, **kwargs) == encode_messages(messages, **encoder_options)
