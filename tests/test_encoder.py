"""Every rule of the DeepSeek-V4 prompt format, beyond the four official fixtures, byte for byte."""

import json

import pytest

from hf_dsv4.template import ChatFormatError, encode_messages, render_segments
from hf_dsv4.template import tokens as T
from hf_dsv4.template.encoder import render_tools

B, E, U, A = T.BOS, T.EOS, T.USER, T.ASSISTANT
DSML = T.DSML


def call(name, arguments, call_id=None):
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        c["id"] = call_id
    return c


def dsml(*invokes):
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


def invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def param(key, value, is_str=True):
    return f'<｜DSML｜parameter name="{key}" string="{"true" if is_str else "false"}">{value}</｜DSML｜parameter>'


# ---------------------------------------------------------------------------------------------- transitions


def test_thinking_mode_opens_think_after_last_user_and_closes_it_after_earlier_users():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"},
    ]
    assert encode_messages(msgs) == f"{B}{U}a{A}</think>b{E}{U}c{A}<think>"


def test_chat_mode_always_closes_think_and_never_renders_reasoning():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"},
    ]
    assert encode_messages(msgs, thinking_mode="chat") == f"{B}{U}a{A}</think>b{E}{U}c{A}</think>"


def test_drop_thinking_false_keeps_all_reasoning_and_opens_think_everywhere():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "r2"},
    ]
    assert encode_messages(msgs, drop_thinking=False) == f"{B}{U}a{A}<think>r1</think>b{E}{U}c{A}<think>r2</think>d{E}"


def test_tools_anywhere_switch_off_dropping_of_earlier_reasoning():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    msgs = [
        {"role": "system", "content": "s", "tools": tools},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r1"},
        {"role": "user", "content": "c"},
    ]
    assert encode_messages(msgs) == f"{B}s\n\n{render_tools(tools)}{U}a{A}<think>r1</think>b{E}{U}c{A}<think>"


def test_developer_messages_before_the_last_user_turn_are_dropped_in_thinking_mode():
    msgs = [
        {"role": "developer", "content": "dev1"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "u"},
    ]
    assert encode_messages(msgs) == f"{B}x{E}{U}u{A}<think>"
    # ... but kept in chat mode, where nothing is dropped
    assert encode_messages(msgs, thinking_mode="chat") == f"{B}{U}dev1{A}</think>x{E}{U}u{A}</think>"


def test_final_system_or_assistant_message_gets_no_transition():
    assert encode_messages([{"role": "system", "content": "s"}]) == f"{B}s"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "reasoning_content": "r"}]
    assert encode_messages(msgs) == f"{B}{U}q{A}<think>r</think>x{E}"


def test_user_followed_by_latest_reminder_gets_its_transition_before_the_reminder():
    msgs = [{"role": "user", "content": "q"}, {"role": "latest_reminder", "content": "today"}]
    assert encode_messages(msgs) == f"{B}{U}q{A}<think>{T.LATEST_REMINDER}today"


def test_consecutive_user_messages_join_one_turn_separated_by_a_blank_line():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert encode_messages(msgs) == f"{B}{U}a\n\nb{A}<think>"


# ---------------------------------------------------------------------------------------------- tools


def test_tool_results_fold_into_one_user_turn_in_tool_call_order():
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "tool_calls": [call("f", '{"x": 1}', "c1"), call("g", {"y": "two"}, "c2")],
        },
        {"role": "tool", "tool_call_id": "c2", "content": "G"},
        {"role": "tool", "tool_call_id": "c1", "content": "F"},
        {"role": "user", "content": "thanks"},
    ]
    calls = dsml(invoke("f", param("x", "1", False)), invoke("g", param("y", "two")))
    expected = (
        f"{B}{U}q{A}</think>{calls}{E}"
        f"{U}<tool_result>F</tool_result>\n\n<tool_result>G</tool_result>\n\nthanks{A}<think>"
    )
    assert encode_messages(msgs) == expected


def test_tool_result_content_blocks_render_text_and_mark_unsupported_parts():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call("f", "{}")]},
        {
            "role": "tool",
            "content": [{"type": "text", "text": "one"}, {"type": "image"}, {"type": "text", "text": "two"}],
        },
    ]
    text = encode_messages(msgs, thinking_mode="chat")
    assert text.endswith(f"{U}<tool_result>one\n\n[Unsupported image]\n\ntwo</tool_result>{A}</think>")


def test_dict_arguments_render_exactly_as_the_same_arguments_given_as_json_string():
    args = {"city": "Zürich", "days": 3, "ratio": 1.5, "ok": True, "none": None, "tags": ["a", "ü"], "o": {"k": [1]}}
    as_dict = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("f", args)]}]
    as_str = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("f", json.dumps(args))]}]
    assert encode_messages(as_dict) == encode_messages(as_str)
    assert encode_messages(as_dict).endswith(
        dsml(
            invoke(
                "f",
                param("city", "Zürich"),
                param("days", "3", False),
                param("ratio", "1.5", False),
                param("ok", "true", False),
                param("none", "null", False),
                param("tags", '["a", "ü"]', False),
                param("o", '{"k": [1]}', False),
            )
        )
        + E
    )


def test_tools_on_a_developer_message_follow_its_content():
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    msgs = [{"role": "developer", "content": "do it", "tools": tools}]
    assert encode_messages(msgs) == f"{B}{U}do it\n\n{render_tools(tools)}{A}<think>"
    assert '{"name": "f", "description": "d", "parameters": {"type": "object"}}' in render_tools(tools)


def test_bare_function_tools_render_like_openai_format_tools():
    fn = {"name": "f", "parameters": {"type": "object"}}
    assert render_tools([fn]) == render_tools([{"type": "function", "function": fn}])


# ---------------------------------------------------------------------------------------------- options and fields


def test_reasoning_effort_max_adds_prefix_after_bos_in_thinking_mode_only():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, reasoning_effort="max") == f"{B}{T.REASONING_EFFORT_MAX_PREFIX}s{U}q{A}<think>"
    assert encode_messages(msgs, reasoning_effort="high") == f"{B}s{U}q{A}<think>"
    assert encode_messages(msgs, thinking_mode="chat", reasoning_effort="max") == f"{B}s{U}q{A}</think>"


def test_response_format_is_appended_to_system_and_developer():
    rf = {"type": "json_schema", "json_schema": {"name": "x"}}
    header = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
    body = '{"type": "json_schema", "json_schema": {"name": "x"}}'
    assert encode_messages([{"role": "system", "content": "s", "response_format": rf}]) == f"{B}s\n\n{header}{body}"
    msgs = [{"role": "developer", "content": "d", "response_format": rf}]
    assert encode_messages(msgs, thinking_mode="chat") == f"{B}{U}d\n\n{header}{body}{A}</think>"


def test_quick_instruction_tasks():
    action = [{"role": "user", "content": "q", "task": "action"}, {"role": "assistant", "content": "Search"}]
    assert encode_messages(action) == f"{B}{U}q{A}<think><｜action｜>Search{E}"
    assert encode_messages(action, thinking_mode="chat") == f"{B}{U}q{A}</think><｜action｜>Search{E}"
    title = [
        {"role": "user", "content": "q", "task": "title"},
        {"role": "assistant", "content": "T", "reasoning_content": "r"},
    ]
    # a non-action task replaces the transition, and the answer after a task carries no reasoning
    assert encode_messages(title) == f"{B}{U}q<｜title｜>T{E}"


def test_wo_eos_leaves_the_assistant_message_open():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "par", "reasoning_content": "r", "wo_eos": True},
    ]
    assert encode_messages(msgs) == f"{B}{U}q{A}<think>r</think>par"


def test_context_is_not_rendered_and_suppresses_bos():
    context = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("f", "{}", "c1")]}]
    msgs = [{"role": "tool", "tool_call_id": "c1", "content": "R"}]
    assert encode_messages(msgs, context=context) == f"{U}<tool_result>R</tool_result>{A}<think>"
    assert encode_messages(msgs, context=context, add_default_bos_token=True).startswith(U)


def test_none_fields_render_as_empty():
    msgs = [
        {"role": "system", "content": None},
        {"role": "user", "content": None},
        {"role": "assistant", "content": None},
    ]
    assert encode_messages(msgs, drop_thinking=False) == f"{B}{U}{A}<think></think>{E}"


def test_segments_mark_exactly_each_assistant_rendering():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "r2"},
    ]
    segments = render_segments(msgs)
    assert [(s.text, s.message_index) for s in segments if s.message_index is not None] == [
        (f"b{E}", 1),
        (f"r2</think>d{E}", 3),
    ]
    assert "".join(s.text for s in segments) == encode_messages(msgs)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages, index, fragment",
    [
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}], 1, "unknown role 'robot'"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}], 1, "no matching call"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [call("f", "{}", "c1")]},
                {"role": "tool", "tool_call_id": "c9", "content": "x"},
            ],
            2,
            "tool_call_id 'c9'",
        ),
        ([{"role": "assistant", "tool_calls": [call("f", "[1, 2]")]}], 0, "must be a JSON object, got list"),
        ([{"role": "assistant", "tool_calls": [call("f", "{oops")]}], 0, "not valid JSON"),
        ([{"role": "assistant", "tool_calls": [call("f", 7)]}], 0, "got int"),
        ([{"role": "assistant", "tool_calls": [call("f", '{"n": ' + "9" * 5000 + "}")]}], 0, "not valid JSON"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], 0, "must be a string or None, got list"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": 3}], 1, "got int"),
        ([{"role": "user", "content": "q", "task": "dance"}], 0, "unknown task 'dance'"),
        (
            [{"role": "user", "content": "q", "tools": [{"type": "function", "function": {"name": "f"}}]}],
            0,
            "only be attached",
        ),
        ([{"role": "developer", "content": ""}], 0, "empty content"),
        (["hello"], 0, "must be a dict"),
    ],
)
def test_bad_messages_raise_chat_format_error_naming_the_message(messages, index, fragment):
    with pytest.raises(ChatFormatError) as info:
        encode_messages(messages)
    assert info.value.index == index
    assert str(info.value).startswith(f"message {index}: ")
    assert fragment in str(info.value)


def test_bad_options_raise_value_errors():
    with pytest.raises(ChatFormatError, match="reasoning_effort must be one of"):
        encode_messages([{"role": "user", "content": "q"}], reasoning_effort="extreme")
    with pytest.raises(ChatFormatError, match="thinking_mode must be one of"):
        encode_messages([{"role": "user", "content": "q"}], thinking_mode="fast")
    assert issubclass(ChatFormatError, ValueError)


def test_input_messages_are_not_modified():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "b", "reasoning_content": "r", "tool_calls": [call("f", {"a": 1}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"},
    ]
    before = json.dumps(msgs)
    encode_messages(msgs)
    assert json.dumps(msgs) == before
