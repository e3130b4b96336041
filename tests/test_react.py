"""ReAct compatibility: keywords, tool descriptions, parsing, formatting and conversion to native messages."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import WEATHER

from hf_dsv4.template import (
    AgentKeyword,
    ChatFormatError,
    ToolDesc,
    encode_messages,
    format_react,
    parse_completion,
    parse_react,
    parse_react_step,
    react_to_messages,
    render_segments,
)
from hf_dsv4.template import tokens as T

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KW = AgentKeyword()


def call(k: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": arguments}}


# ----------------------------------------------------------------------------------------------------------
# AgentKeyword and ToolDesc
# ----------------------------------------------------------------------------------------------------------


def test_agent_keyword_defaults_and_help_text():
    assert [(f.name, getattr(KW, f.name)) for f in fields(KW)] == [
        ("action", "Action:"),
        ("action_input", "Action Input:"),
        ("observation", "Observation:"),
        ("thought", "Thought:"),
        ("final_answer", "Final Answer:"),
    ]
    assert all(f.metadata["help"] for f in fields(KW))


@pytest.mark.parametrize("kwargs", [{"action": ""}, {"action": "  "}, {"thought": "Action:"}])
def test_agent_keyword_rejects_blank_or_repeated_keywords(kwargs):
    with pytest.raises(ValueError, match="AgentKeyword needs distinct, non-blank keywords"):
        AgentKeyword(**kwargs)


def test_tool_desc_converts_from_and_to_openai_and_renders_one_line():
    tool = ToolDesc.from_openai(WEATHER)
    assert tool == ToolDesc("get_weather", "Current weather of a city.", WEATHER["function"]["parameters"])
    assert tool.to_openai() == WEATHER
    assert ToolDesc.from_openai(WEATHER["function"]) == tool
    assert str(tool) == (
        "get_weather: Current weather of a city. Parameters: "
        '{"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}'
    )
    assert tool.render("{name} - {description}") == "get_weather - Current weather of a city."
    assert ToolDesc.from_openai({"function": {"name": "noop"}}) == ToolDesc("noop", "", {})
    assert all(f.metadata["help"] for f in fields(ToolDesc))


# ----------------------------------------------------------------------------------------------------------
# parse_react / parse_react_step
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action_input, arguments",
    [
        ('{"location": "Oslo"}', '{"location": "Oslo"}'),
        ('```json\n{"location": "Oslo"}\n```', '{"location": "Oslo"}'),
        ("Oslo, Norway", '{"input": "Oslo, Norway"}'),
        ("[1, 2]", '{"input": [1, 2]}'),
        ('"Oslo"', '{"input": "Oslo"}'),
        ("", "{}"),
        ("{broken", '{"input": "{broken"}'),
    ],
)
def test_action_input_becomes_json_object_arguments(action_input, arguments):
    text = f"Thought: look it up\nAction: get_weather\nAction Input: {action_input}"
    assert parse_react(text) == [call(0, "get_weather", arguments)]


def test_parse_react_step_returns_thought_calls_and_final_answer():
    text = 'I will check.\nThought: two cities\nAction: get_weather\nAction Input: {"location": "Oslo"}\n  Action: get_weather\nAction Input: {"location": "Paris"}\n'
    assert parse_react_step(text) == {
        "thought": "I will check.\ntwo cities",
        "tool_calls": [call(0, "get_weather", '{"location": "Oslo"}'), call(1, "get_weather", '{"location": "Paris"}')],
        "final_answer": None,
    }
    assert parse_react_step("Thought: easy\nFinal Answer: 42\nmore lines") == {
        "thought": "easy",
        "tool_calls": [],
        "final_answer": "42\nmore lines",
    }


def test_parse_react_stops_at_the_first_observation():
    text = "Action: a\nObservation: hallucinated\nAction: b\nAction Input: {}\nFinal Answer: no"
    assert parse_react_step(text) == {"thought": "", "tool_calls": [call(0, "a", "{}")], "final_answer": None}


def test_keywords_count_only_at_line_start():
    assert parse_react("I said Action: x inline") == []
    assert parse_react_step("say Final Answer: soon") == {
        "thought": "say Final Answer: soon",
        "tool_calls": [],
        "final_answer": None,
    }


def test_custom_keywords():
    kw = AgentKeyword(
        action="行动：", action_input="行动输入：", observation="观察：", thought="思考：", final_answer="答案："
    )
    text = '思考：查天气\n行动：get_weather\n行动输入：{"location": "北京"}'
    assert parse_react_step(text, kw) == {
        "thought": "查天气",
        "tool_calls": [call(0, "get_weather", '{"location": "北京"}')],
        "final_answer": None,
    }
    assert parse_react(text) == []


@FAST
@given(
    text=st.lists(
        st.one_of(st.text(max_size=8), st.sampled_from([f.default for f in fields(KW)] + ["\n", "{", "```"]))
    ).map("".join)
)
def test_react_parsing_never_raises_and_conversion_raises_only_chat_format_error(text):
    step = parse_react_step(text)
    assert set(step) == {"thought", "tool_calls", "final_answer"}
    for c in step["tool_calls"]:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    try:
        react_to_messages(
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": text},
                {"role": "user", "content": text},
            ]
        )
    except ChatFormatError as error:
        assert error.index in (1, 2)


# ----------------------------------------------------------------------------------------------------------
# format_react
# ----------------------------------------------------------------------------------------------------------


def test_format_react_writes_assistant_and_tool_messages():
    message = {
        "role": "assistant",
        "content": "Need data.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Oslo"}}},
            {"type": "function", "function": {"name": "noop", "arguments": "{}"}},
        ],
    }
    assert format_react(message) == (
        'Thought: Need data.\nAction: get_weather\nAction Input: {"location": "Oslo"}\nAction: noop\nAction Input: {}'
    )
    assert (
        format_react({"role": "assistant", "content": "42", "reasoning_content": "easy"})
        == "Thought: easy\nFinal Answer: 42"
    )
    assert format_react({"role": "assistant", "content": "42"}) == "Final Answer: 42"
    assert format_react({"role": "tool", "tool_call_id": "call_0", "content": "3°C"}) == "Observation: 3°C"
    kw = AgentKeyword(observation="Result:")
    assert format_react({"role": "tool", "content": "ok"}, kw) == "Result: ok"


def test_format_react_rejects_other_roles():
    with pytest.raises(ValueError, match="format_react formats assistant and tool messages, not 'user'"):
        format_react({"role": "user", "content": "hi"})


# ----------------------------------------------------------------------------------------------------------
# react_to_messages
# ----------------------------------------------------------------------------------------------------------

REACT = [
    {"role": "system", "content": "Use tools.", "tools": [WEATHER]},
    {"role": "user", "content": "Weather in Oslo and Paris?"},
    {
        "role": "assistant",
        "content": 'Thought: I need both cities.\nAction: get_weather\nAction Input: {"location": "Oslo"}\n'
        'Action: get_weather\nAction Input: {"location": "Paris"}',
    },
    {"role": "user", "content": "Observation: 3°C\nObservation: 12°C"},
    {"role": "assistant", "content": "Thought: I know both.\nFinal Answer: Oslo 3°C, Paris 12°C."},
]
NATIVE = [
    REACT[0],
    REACT[1],
    {
        "role": "assistant",
        "content": "I need both cities.",
        "tool_calls": [call(0, "get_weather", '{"location": "Oslo"}'), call(1, "get_weather", '{"location": "Paris"}')],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "3°C"},
    {"role": "tool", "tool_call_id": "call_1", "content": "12°C"},
    {"role": "assistant", "content": "Oslo 3°C, Paris 12°C.", "reasoning_content": "I know both."},
]


def test_react_conversation_with_observations_in_user_turns_becomes_native_messages():
    assert react_to_messages(REACT) == NATIVE


def test_react_trajectory_in_one_assistant_text_becomes_native_messages():
    text = "\n".join([REACT[2]["content"], REACT[3]["content"], REACT[4]["content"]])
    assert react_to_messages([*REACT[:2], {"role": "assistant", "content": text}]) == NATIVE


def test_plain_messages_are_copied_and_ids_count_across_the_conversation():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "time?"},
        {
            "role": "assistant",
            "content": "Action: clock\nObservation: 9:00\nAction: clock\nObservation: 9:01\nFinal Answer: 9",
        },
    ]
    assert react_to_messages(messages) == [
        *messages[:3],
        {"role": "assistant", "content": "", "tool_calls": [call(0, "clock", "{}")]},
        {"role": "tool", "tool_call_id": "call_0", "content": "9:00"},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "clock", "{}")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "9:01"},
        {"role": "assistant", "content": "9"},
    ]


def test_input_reasoning_goes_to_the_first_message_made_from_it():
    message = {"role": "assistant", "content": "Thought: go\nAction: a", "reasoning_content": "hidden"}
    assert react_to_messages([{"role": "user", "content": "q"}, message])[1] == {
        "role": "assistant",
        "content": "go",
        "tool_calls": [call(0, "a", "{}")],
        "reasoning_content": "hidden",
    }


@pytest.mark.parametrize(
    "messages, index, problem",
    [
        ([{"role": "assistant", "content": "Observation: x"}], 0, "'Observation:' without a pending action"),
        ([{"role": "assistant", "content": "Action Input: {}"}], 0, "'Action Input:' without a preceding action"),
        (
            [{"role": "assistant", "content": "Action: a\nAction Input: {}\nAction Input: {}"}],
            0,
            "'Action Input:' without a preceding action",
        ),
        (
            [{"role": "assistant", "content": "Action: a\nThought: hm"}],
            0,
            "'Thought:' after an action without an observation",
        ),
        (
            [{"role": "assistant", "content": "Action: a\nFinal Answer: b"}],
            0,
            "final answer while tool calls ['call_0'] have no observation",
        ),
        (
            [{"role": "assistant", "content": "Action: a\nAction: b\nObservation: x\nAction: c"}],
            0,
            "an action while tool calls ['call_1'] have no observation",
        ),
        (
            [{"role": "assistant", "content": "Action: a"}, {"role": "user", "content": "ok"}],
            1,
            "expected only 'Observation:' sections answering tool calls ['call_0']",
        ),
        (
            [
                {"role": "assistant", "content": "Action: a"},
                {"role": "user", "content": "Observation: 1\nObservation: 2"},
            ],
            1,
            "2 observations for 1 pending tool calls",
        ),
        (
            [{"role": "assistant", "content": "Action: a"}, {"role": "assistant", "content": "Thought: b"}],
            1,
            "tool calls ['call_0'] got no 'Observation:'",
        ),
        (
            [{"role": "assistant", "content": "Action: a"}, {"role": "system", "content": "x"}],
            1,
            "expected a user message with 'Observation:' for tool calls ['call_0']",
        ),
    ],
)
def test_conversion_errors_name_the_message_index(messages, index, problem):
    with pytest.raises(ChatFormatError) as info:
        react_to_messages(messages)
    assert (info.value.index, info.value.problem) == (index, problem)
    assert str(info.value) == f"message {index}: {problem}"


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_converted_conversation_encodes_to_dsml_that_parses_back_to_the_same_calls(mode):
    native = react_to_messages(REACT)
    text = encode_messages(native, thinking_mode=mode)
    assert f'{T.TOOL_CALLS_START}\n<{T.DSML}invoke name="get_weather">\n' in text
    assert f"{T.TOOL_RESULT_START}3°C{T.TOOL_RESULT_END}\n\n{T.TOOL_RESULT_START}12°C{T.TOOL_RESULT_END}" in text
    segments = render_segments(native, thinking_mode=mode)
    spans = [(k, s) for k, s in enumerate(segments) if s.message_index is not None]
    assert [s.message_index for _, s in spans] == [2, 5]
    for k, segment in spans:
        segment_mode = "thinking" if segments[k - 1].text.endswith(T.THINK_START) else "chat"
        parsed = parse_completion(segment.text, segment_mode, tools=[WEATHER])
        original = native[segment.message_index]
        assert parsed["content"] == original["content"]
        assert parsed.get("tool_calls", []) == original.get("tool_calls", [])  # ids coincide: call_0, call_1
        if segment_mode == "thinking":
            assert parsed["reasoning_content"] == original.get("reasoning_content", "")


# ----------------------------------------------------------------------------------------------------------
# Round trip: native -> format_react -> react_to_messages
# ----------------------------------------------------------------------------------------------------------

KEYWORDS = [f.default for f in fields(KW)]


def plain(text: str) -> bool:
    return text == text.strip() and not any(
        line.lstrip(" \t").startswith(w) for line in text.split("\n") for w in KEYWORDS
    )


texts = (
    st.lists(st.one_of(st.text(max_size=6), st.sampled_from(KEYWORDS + ["\n", " ", "{"])), max_size=6)
    .map("".join)
    .filter(plain)
)
names = st.text(max_size=12).filter(lambda s: "\n" not in s and plain(s))
arguments = st.dictionaries(
    st.text(max_size=5), st.none() | st.integers() | texts | st.lists(st.booleans(), max_size=2), max_size=3
)


@st.composite
def native_conversations(draw) -> tuple[list[dict], list[dict]]:
    """(native messages, the same conversation written as ReAct text)."""
    native, react, k = [{"role": "user", "content": "q"}], [{"role": "user", "content": "q"}], 0
    for _ in range(draw(st.integers(0, 2))):
        calls = [
            call(k + j, n, json.dumps(a, ensure_ascii=False))
            for j, (n, a) in enumerate(draw(st.lists(st.tuples(names, arguments), min_size=1, max_size=2)))
        ]
        k += len(calls)
        step = {"role": "assistant", "content": draw(texts), "tool_calls": calls}
        results = [{"role": "tool", "tool_call_id": c["id"], "content": draw(texts)} for c in calls]
        native += [step, *results]
        react += [
            {"role": "assistant", "content": format_react(step)},
            {"role": "user", "content": "\n".join(map(format_react, results))},
        ]
    final = {"role": "assistant", "content": draw(texts)}
    reasoning = draw(texts)
    if reasoning:
        final["reasoning_content"] = reasoning
    native.append(final)
    react.append({"role": "assistant", "content": format_react(final)})
    return native, react


@FAST
@given(conversation=native_conversations())
def test_format_react_then_react_to_messages_gives_the_native_conversation_back(conversation):
    native, react = conversation
    assert react_to_messages(react) == native
    encode_messages(native)  # and the encoder accepts it
