"""`parse_completion`: official fixture spans, exact results and errors, round trip with the encoder, fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import load_fixture

from hf_dsv4.template import DSMLParseError, parse_completion, render_segments
from hf_dsv4.template import tokens as T

EOS = T.EOS
D = T.DSML
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def call(k: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": arguments}}


def block(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def invoke(name: str, *params: str) -> str:
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def param(key: str, value: str, string: bool = True) -> str:
    return f'<{D}parameter name="{key}" string="{"true" if string else "false"}">{value}</{D}parameter>'


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


# ----------------------------------------------------------------------------------------------------------
# The official fixtures: assistant spans cut from DeepSeek's own output files, not from our encoder.
# ----------------------------------------------------------------------------------------------------------


def official_spans(case: int) -> list[str]:
    _, _, expected = load_fixture(case)
    return [part[: part.index(EOS) + len(EOS)] for part in expected.split(T.ASSISTANT + T.THINK_START)[1:]]


def test_fixture_1_spans_parse_to_the_official_messages():
    messages, _, _ = load_fixture(1)
    tools = messages[0]["tools"]
    first, second = official_spans(1)
    assert first == (
        "The user wants to know the weather in Beijing. I should use the get_weather tool.</think>\n\n"
        f'<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="location" string="true">Beijing</{D}parameter>\n'
        f'<{D}parameter name="unit" string="true">celsius</{D}parameter>\n'
        f"</{D}invoke>\n</{D}tool_calls>{EOS}"
    )
    expected_first = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "The user wants to know the weather in Beijing. I should use the get_weather tool.",
        "tool_calls": [call(0, "get_weather", '{"location": "Beijing", "unit": "celsius"}')],
    }
    assert parse_completion(first) == expected_first
    assert parse_completion(first, tools=tools) == expected_first
    assert parse_completion(second, tools=tools) == {
        "role": "assistant",
        "content": "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity.",
        "reasoning_content": "Got the weather data. Let me format a nice response.",
    }
    # the same calls as the fixture's input message (whose id is call_001: ids are not in the format)
    original = messages[2]["tool_calls"][0]["function"]
    parsed = parse_completion(first)["tool_calls"][0]["function"]
    assert parsed["name"] == original["name"]
    assert json.loads(parsed["arguments"]) == json.loads(original["arguments"])


def test_fixture_3_spans_parse_to_the_official_messages():
    messages, _, _ = load_fixture(3)
    tools = messages[2]["tools"]
    first, second = official_spans(3)
    expected_first = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "用户想知道小柴胡冲剂和布洛芬能否一起服用。",
        "tool_calls": [call(0, "search", '{"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}')],
    }
    assert parse_completion(first, tools=tools) == expected_first
    assert parse_completion(first.removesuffix(EOS), tools=tools) == expected_first
    assert parse_completion(second, tools=tools) == {
        "role": "assistant",
        "content": "请及时就医。",
        "reasoning_content": "现在开始组织回答。",
    }


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_every_fixture_assistant_segment_parses_back_to_its_message(case):
    messages, mode, _ = load_fixture(case)
    segments = render_segments(messages, thinking_mode=mode)
    for k, segment in enumerate(segments):
        if segment.message_index is None:
            continue
        message = messages[segment.message_index]
        segment_mode = "thinking" if segments[k - 1].text.endswith(T.THINK_START) else "chat"
        parsed = parse_completion(segment.text, segment_mode)
        assert parsed["content"] == (message.get("content") or "")
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.get("tool_calls", [])]
        expected = [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []
        ]
        assert calls == expected


# ----------------------------------------------------------------------------------------------------------
# Exact results
# ----------------------------------------------------------------------------------------------------------


def test_chat_mode_content_has_no_reasoning_key():
    assert parse_completion("Hello there." + EOS, "chat") == {"role": "assistant", "content": "Hello there."}
    assert parse_completion("", "chat") == {"role": "assistant", "content": ""}


def test_thinking_mode_always_has_reasoning_key():
    assert parse_completion("</think>Hi") == {"role": "assistant", "content": "Hi", "reasoning_content": ""}


def test_several_calls_get_ids_in_order_and_json_values():
    text = (
        "Let me check."
        + block(
            invoke("get_weather", param("location", "Paris"), param("days", "3", string=False)),
            invoke("lookup", param("filter", '{"a": [1, 2.5, null, true]}', string=False)),
            invoke("noop"),
        )
        + EOS
    )
    assert text.endswith(f'<{D}invoke name="noop">\n\n</{D}invoke>\n</{D}tool_calls>{EOS}')
    assert parse_completion(text, "chat") == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            call(0, "get_weather", '{"location": "Paris", "days": 3}'),
            call(1, "lookup", '{"filter": {"a": [1, 2.5, null, true]}}'),
            call(2, "noop", "{}"),
        ],
    }


def test_string_values_are_raw_text_including_newlines_quotes_and_special_tokens():
    value = 'line 1\n"quoted" </think> <tag> {not json'
    text = "r</think>" + block(invoke("echo", param("text", value)))
    assert parse_completion(text)["tool_calls"] == [call(0, "echo", json.dumps({"text": value}, ensure_ascii=False))]


def test_content_ending_in_blank_lines_keeps_them():
    text = "a\n\n" + block(invoke("f"))
    assert parse_completion(text, "chat")["content"] == "a\n\n"


@pytest.mark.parametrize(
    "schema, string, raw, expected",
    [
        ({"type": "string"}, False, "not json", "not json"),
        ({"type": "string"}, False, '"quoted"', "quoted"),
        ({"type": "string"}, False, "123", "123"),
        ({"type": "string"}, True, "123", "123"),
        ({"type": "integer"}, True, "42", 42),
        ({"type": "integer"}, True, "4.5", "4.5"),
        ({"type": "integer"}, True, "forty", "forty"),
        ({"type": "number"}, True, "4.5", 4.5),
        ({"type": "number"}, True, "true", "true"),
        ({"type": "boolean"}, True, "true", True),
        ({"type": "array"}, True, "[1, 2]", [1, 2]),
        ({"type": "object"}, True, '{"k": "v"}', {"k": "v"}),
        ({"type": ["integer", "null"]}, True, "null", None),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, True, "7", "7"),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, False, "7", 7),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, False, "x7", "x7"),
        ({"type": "integer"}, False, '"7"', "7"),
        ({"description": "untyped"}, False, "[1]", [1]),
        ({"description": "untyped"}, True, "[1]", "[1]"),
    ],
)
def test_values_are_typed_by_the_tool_schema(schema, string, raw, expected):
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": schema}}},
    }
    text = block(invoke("f", param("x", raw, string)))
    parsed = parse_completion(text, "chat", tools=[tool])
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"x": expected}


def test_without_tools_string_flag_decides_the_type():
    text = block(invoke("f", param("a", "12"), param("b", "12", string=False)))
    assert parse_completion(text, "chat")["tool_calls"] == [call(0, "f", '{"a": "12", "b": 12}')]


def test_bare_function_dicts_and_additional_properties_are_accepted():
    tool = {"name": "f", "parameters": {"type": "object", "properties": {}, "additionalProperties": True}}
    text = block(invoke("f", param("anything", "1", string=False)))
    assert parse_completion(text, "chat", tools=[tool])["tool_calls"] == [call(0, "f", '{"anything": 1}')]


# ----------------------------------------------------------------------------------------------------------
# Strict errors: exact type and offset
# ----------------------------------------------------------------------------------------------------------

GOOD = block(invoke("get_weather", param("location", "Paris")))  # chat-mode body, starts at offset 0


def error_of(text: str, mode: str = "chat", tools=None) -> DSMLParseError:
    with pytest.raises(DSMLParseError) as info:
        parse_completion(text, mode, tools=tools)
    assert type(info.value) is DSMLParseError
    assert f"offset {info.value.offset}:" in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "text, mode, offset, problem",
    [
        ("just reasoning", "thinking", 14, "expected '</think>' to end the reasoning"),
        ("just reasoning" + EOS, "thinking", 14, "expected '</think>' to end the reasoning"),
        ("a<think>b</think>c", "thinking", 1, "expected plain reasoning text and '</think>'"),
        ("plan" + GOOD, "thinking", 6, "expected plain reasoning text and '</think>'"),
        ("ok</think>x" + EOS + "more", "thinking", 11 + len(EOS), f"expected nothing after {EOS!r}"),
        ("hi <｜User｜> there", "chat", 3, "expected plain content text, a tool-call block or EOS"),
        ("a</think>b", "chat", 1, "expected plain content text, a tool-call block or EOS"),
        (f"x <{D}invoke", "chat", 2, "expected plain content text, a tool-call block or EOS"),
        ("x" + GOOD.lstrip("\n"), "chat", 1, 'expected a blank line ("\\n\\n") before'),
        (GOOD + "\n", "chat", len(GOOD), f"expected {EOS!r} or the end of the output after the tool calls"),
        (GOOD + EOS + "x", "chat", len(GOOD + EOS), f"expected nothing after {EOS!r}"),
        (f"\n\n<{D}tool_calls>\n</{D}tool_calls>", "chat", 21, f"expected {'<' + D + 'invoke name=' + chr(34)!r}"),
        (GOOD[:-2], "chat", GOOD.rindex("\n</"), "expected '\\n<｜DSML｜invoke name=\"' or '\\n</｜DSML｜tool_calls>'"),
    ],
)
def test_strict_errors_name_the_offset_and_what_was_expected(text, mode, offset, problem):
    error = error_of(text, mode)
    assert (error.offset, error.problem[: len(problem)]) == (offset, problem)


def test_unterminated_parameter_value_points_at_the_end():
    text = GOOD[: GOOD.index("Paris") + 5]
    error = error_of(text)
    assert (error.offset, error.problem) == (len(text), f"expected {T.PARAMETER_END!r} to end the value of 'location'")


def test_parameter_value_running_into_another_tag_points_at_that_tag():
    text = block(invoke("f", f'<{D}parameter name="a" string="true">x' + param("b", "y")))
    error = error_of(text)
    assert error.offset == text.index(f'<{D}parameter name="b"')
    assert error.problem == f"expected {T.PARAMETER_END!r} to end the value of 'a'"


def test_junk_between_tags_is_an_error_at_the_junk():
    text = block(invoke("f", param("a", "1"))).replace(f"</{D}parameter>\n", f"</{D}parameter>junk\n")
    error = error_of(text)
    assert error.offset == text.index("junk")
    assert error.problem == f"expected '\\n<{D}parameter name=\"' or '\\n</{D}invoke>'"


def test_duplicate_parameter_is_an_error_at_the_second_name():
    text = block(invoke("f", param("a", "1"), param("a", "2")))
    error = error_of(text)
    assert (error.offset, error.problem) == (text.rindex('"a"') + 1, "duplicate parameter 'a' in the call of 'f'")


def test_bad_string_flag_is_an_error():
    text = block(invoke("f", f'<{D}parameter name="a" string="yes">1</{D}parameter>'))
    error = error_of(text)
    assert (error.offset, error.problem) == (text.index("yes"), "expected 'true\">' or 'false\">'")


def test_missing_tool_name_is_an_error():
    text = block(invoke(""))
    error = error_of(text)
    assert (error.offset, error.problem) == (text.index('">'), "expected a tool name and '\">\\n'")


def test_invalid_json_points_into_the_value():
    text = block(invoke("f", param("a", "[1, 2,, 3]", string=False)))
    error = error_of(text)
    assert (error.offset, error.problem) == (
        text.index(",,") + 1,
        "expected JSON for the string=\"false\" value of 'a'",
    )


@pytest.mark.parametrize("raw", ["NaN", "-Infinity", "[" * 100_000])
def test_non_standard_or_too_deep_json_is_rejected(raw):
    text = block(invoke("f", param("a", raw, string=False)))
    assert error_of(text).offset == text.index(raw)
    assert parse_completion(text, "chat", strict=False)["tool_calls"] == [call(0, "f", json.dumps({"a": raw}))]


def test_unknown_tool_and_parameter_are_errors_only_with_tools():
    unknown_tool = block(invoke("get_time", param("zone", "UTC")))
    error = error_of(unknown_tool, tools=[WEATHER])
    assert (error.offset, error.problem) == (
        unknown_tool.index("get_time"),
        "unknown tool 'get_time'; expected one of ['get_weather']",
    )
    unknown_param = block(invoke("get_weather", param("city", "Oslo")))
    error = error_of(unknown_param, tools=[WEATHER])
    assert (error.offset, error.problem) == (
        unknown_param.index("city"),
        "unknown parameter 'city' of tool 'get_weather'; expected one of ['location', 'days']",
    )
    assert parse_completion(unknown_param, "chat")["tool_calls"] == [call(0, "get_weather", '{"city": "Oslo"}')]


def test_error_message_shows_what_was_found():
    assert (
        str(error_of("ab", "thinking"))
        == "offset 2: expected '</think>' to end the reasoning; found the end of the text"
    )
    assert str(error_of("a<｜User｜>b")) == (
        "offset 1: expected plain content text, a tool-call block or EOS; found '<｜User｜>b'"
    )


def test_invalid_thinking_mode_is_a_value_error_even_when_not_strict():
    with pytest.raises(ValueError, match="thinking_mode must be one of"):
        parse_completion("x", "fast", strict=False)


# ----------------------------------------------------------------------------------------------------------
# strict=False
# ----------------------------------------------------------------------------------------------------------


def lenient(text: str, mode: str = "chat", tools=None) -> dict:
    return parse_completion(text, mode, tools=tools, strict=False)


def test_lenient_missing_think_end_gives_everything_as_content_without_calls():
    text = "drafting" + GOOD + EOS + "junk"
    assert lenient(text, "thinking") == {"role": "assistant", "content": "drafting" + GOOD, "reasoning_content": ""}


def test_lenient_broken_block_stays_verbatim_in_content():
    broken = GOOD.replace(f"</{D}invoke>", "")
    text = "r</think>hello" + broken + EOS
    assert lenient(text, "thinking") == {"role": "assistant", "content": "hello" + broken, "reasoning_content": "r"}


def test_lenient_block_followed_by_text_stays_verbatim_but_trailing_whitespace_is_ignored():
    assert lenient("c" + GOOD + " more") == {"role": "assistant", "content": "c" + GOOD + " more"}
    assert lenient("c" + GOOD + "\n \n") == {
        "role": "assistant",
        "content": "c",
        "tool_calls": [call(0, "get_weather", '{"location": "Paris"}')],
    }


def test_lenient_drops_text_after_eos_and_keeps_special_tokens_in_content():
    assert lenient("a<｜User｜>b" + EOS + "<｜User｜>next turn") == {"role": "assistant", "content": "a<｜User｜>b"}


def test_lenient_tolerates_semantic_problems_inside_a_well_formed_block():
    assert lenient("x" + GOOD.lstrip("\n")) == {
        "role": "assistant",
        "content": "x",
        "tool_calls": [call(0, "get_weather", '{"location": "Paris"}')],
    }
    duplicate = block(invoke("f", param("a", "1"), param("a", "2", string=False)))
    assert lenient(duplicate)["tool_calls"] == [call(0, "f", '{"a": 2}')]
    assert lenient(block(invoke("f", param("a", "{oops", string=False))))["tool_calls"] == [
        call(0, "f", '{"a": "{oops"}')
    ]
    unknown = block(invoke("get_weather", param("city", "3", string=False), param("days", "4")))
    assert lenient(unknown, tools=[WEATHER])["tool_calls"] == [call(0, "get_weather", '{"city": 3, "days": 4}')]


def test_lenient_falls_back_to_react_when_there_is_no_dsml_block():
    text = 'Thought: I should look.\nAction: get_weather\nAction Input: {"location": "Oslo"}\nObservation: sunny'
    assert lenient("r</think>" + text + EOS, "thinking") == {
        "role": "assistant",
        "content": "Thought: I should look.",
        "reasoning_content": "r",
        "tool_calls": [call(0, "get_weather", '{"location": "Oslo"}')],
    }
    assert parse_completion(text, "chat") == {"role": "assistant", "content": text}  # strict: no fallback
    assert lenient("Final Answer: 4") == {"role": "assistant", "content": "Final Answer: 4"}


# Shapes real DeepSeek-V4 output takes outside the grammar (issue sgl-project/sglang#38924, SGLang's DeepSeekV4Detector)

CALLS_BLOCK = block(invoke("get_weather", param("location", "Paris")))
PARIS = call(0, "get_weather", '{"location": "Paris"}')
JSON_BODY = f'<{D}invoke name="get_weather">\n{{"location": "Paris", "days": 3}}\n</{D}invoke>'


def test_lenient_recovers_a_bare_invoke_without_the_tool_calls_wrapper():
    bare = invoke("get_weather", param("location", "Paris"))
    assert lenient("Let me check.\n\n" + bare + EOS) == {"role": "assistant", "content": "Let me check.",
                                                         "tool_calls": [PARIS]}  # fmt: skip
    two = bare + "\n" + invoke("get_weather", param("location", "Oslo"))
    assert [c["function"]["arguments"] for c in lenient(two)["tool_calls"]] == ['{"location": "Paris"}',
                                                                                '{"location": "Oslo"}']  # fmt: skip


def test_lenient_recovers_several_tool_call_sections_with_ids_running_on():
    second = block(invoke("get_weather", param("location", "Oslo")), invoke("get_weather", param("location", "Rome")))
    message = lenient("c" + CALLS_BLOCK + second + "\n" + invoke("get_weather", param("location", "Bern")) + "\n")
    assert message["content"] == "c"
    assert [(c["id"], json.loads(c["function"]["arguments"])["location"]) for c in message["tool_calls"]] == [
        ("call_0", "Paris"), ("call_1", "Oslo"), ("call_2", "Rome"), ("call_3", "Bern")]  # fmt: skip
    # anything else between or after them: nothing is run, everything stays in the content
    assert lenient("c" + CALLS_BLOCK + " and " + second) == {
        "role": "assistant",
        "content": "c" + CALLS_BLOCK + " and " + second,
    }


def test_lenient_recovers_an_invoke_whose_body_is_a_json_object():
    text = f"c\n\n<{D}tool_calls>\n{JSON_BODY}\n</{D}tool_calls>"
    assert lenient(text)["tool_calls"] == [call(0, "get_weather", '{"location": "Paris", "days": 3}')]
    assert lenient(JSON_BODY.replace("}\n<", "}<"))["tool_calls"] == lenient(text)["tool_calls"]  # no newline
    not_an_object = JSON_BODY.replace('{"location": "Paris", "days": 3}', "[1, 2]")
    assert lenient("c" + not_an_object) == {"role": "assistant", "content": "c" + not_an_object}


@pytest.mark.parametrize(
    "arguments",
    [
        param("arguments", '{"location": "Paris", "days": 3}', string=False),
        param("arguments", '{"location": "Paris", "days": 3}'),  # the JSON as text
        param("input", '{"location": "Paris", "days": 3}', string=False),
    ],
)
def test_lenient_unwraps_a_spurious_arguments_or_input_parameter_when_the_schema_says_so(arguments):
    text = block(invoke("get_weather", arguments))
    unwrapped = [call(0, "get_weather", '{"location": "Paris", "days": 3}')]
    assert lenient(text, tools=[WEATHER])["tool_calls"] == unwrapped
    assert lenient(text)["tool_calls"] != unwrapped  # no schema: nothing says it is a wrapper
    body = JSON_BODY.replace('{"location": "Paris", "days": 3}', '{"input": {"location": "Paris", "days": 3}}')
    assert lenient(body, tools=[WEATHER])["tool_calls"] == unwrapped


SHELL = {"type": "function", "function": {"name": "shell", "parameters": {"type": "object", "required": ["command"],
         "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}}}}  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        '{"arguments": "cd /x && ls"}',  # the invoke's body a JSON object with a scalar under a spurious key
        param("arguments", "cd /x && ls"),  # the same as an XML parameter
        param("arguments", '"cd /x && ls"', string=False),  # ... holding a JSON string
    ],
    ids=["json", "xml", "xml-json-string"],
)
def test_lenient_gives_a_wrapped_scalar_to_the_one_required_string_parameter(body):
    """SGLang's DeepSeek-V4 detector recovers these: for a tool whose schema has exactly one required parameter, a
    string one, a scalar under a spurious `arguments` key is that parameter."""
    text = block(invoke("shell", body))
    assert lenient(text, tools=[SHELL])["tool_calls"] == [call(0, "shell", '{"command": "cd /x && ls"}')]
    assert lenient(text)["tool_calls"] == [call(0, "shell", '{"arguments": "cd /x && ls"}')]  # no schema: kept
    two_required = json.loads(json.dumps(SHELL))
    two_required["function"]["parameters"]["required"] = ["command", "timeout"]
    assert lenient(text, tools=[two_required])["tool_calls"] == [call(0, "shell", '{"arguments": "cd /x && ls"}')]
    not_a_string = json.loads(json.dumps(SHELL))
    not_a_string["function"]["parameters"]["properties"]["command"] = {"type": "array"}
    assert lenient(text, tools=[not_a_string])["tool_calls"] == [call(0, "shell", '{"arguments": "cd /x && ls"}')]
    with pytest.raises(DSMLParseError):  # strict: the grammar only
        parse_completion(text, "chat", tools=[SHELL])


def test_a_tool_that_declares_an_arguments_parameter_keeps_it():
    runner = {"type": "function", "function": {"name": "run", "parameters": {
        "type": "object", "properties": {"arguments": {"type": "object"}}}}}  # fmt: skip
    text = block(invoke("run", param("arguments", '{"location": "Paris"}', string=False)))
    assert lenient(text, tools=[runner])["tool_calls"] == [call(0, "run", '{"arguments": {"location": "Paris"}}')]
    undeclared = block(invoke("get_weather", param("arguments", '{"city": "Paris"}', string=False)))
    assert lenient(undeclared, tools=[WEATHER])["tool_calls"] == [
        call(0, "get_weather", '{"arguments": {"city": "Paris"}}')]  # fmt: skip


def test_lenient_takes_a_preamble_followed_by_one_newline_or_none():
    calls_block = CALLS_BLOCK.removeprefix("\n\n")
    for glue, content in (("\n", "Checking."), ("", "Checking."), ("\n\n\n", "Checking.\n")):
        assert lenient("Checking." + glue + calls_block) == {"role": "assistant", "content": content,
                                                            "tool_calls": [PARIS]}  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "c\n\n" + invoke("get_weather", param("location", "Paris")),
        "c" + CALLS_BLOCK + CALLS_BLOCK,
        f"c\n\n<{D}tool_calls>\n{JSON_BODY}\n</{D}tool_calls>",
        "c\n" + CALLS_BLOCK.removeprefix("\n\n"),
    ],
)
def test_strict_keeps_the_exact_grammar_for_every_recovered_shape(text):
    with pytest.raises(DSMLParseError):
        parse_completion(text, "chat")
    assert "tool_calls" in lenient(text)
    wrapped = block(invoke("get_weather", param("arguments", '{"location": "Paris"}', string=False)))
    with pytest.raises(DSMLParseError, match="unknown parameter 'arguments'"):
        parse_completion(wrapped, "chat", tools=[WEATHER])
    assert parse_completion(wrapped, "chat")["tool_calls"] == [
        call(0, "get_weather", '{"arguments": {"location": "Paris"}}')
    ]


# ----------------------------------------------------------------------------------------------------------
# Round trip with the encoder, and fuzzing
# ----------------------------------------------------------------------------------------------------------

FRAGMENTS = ["<", ">", "/", "｜", "▁", "DSML", "think", '"', "=", "\n", "\n\n", " ", "string", "name", "true", "{", "]"]


def free_of_markup(text: str) -> bool:
    return D not in text and not any(token in text for token in T.SPECIAL_TOKENS)


texts = (
    st.lists(st.one_of(st.text(max_size=6), st.sampled_from(FRAGMENTS)), max_size=8).map("".join).filter(free_of_markup)
)
names = texts.filter(lambda s: s and (s + '">\n').find('">\n') == len(s))
keys = texts.filter(lambda s: (s + '" string="').find('" string="') == len(s))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
arguments = st.dictionaries(keys, json_values, max_size=4)


@st.composite
def assistant_messages(draw) -> tuple[dict, list[tuple[str, dict]]]:
    """A valid assistant message and its calls as (name, arguments dict)."""
    calls = draw(st.lists(st.tuples(names, arguments), max_size=3))
    message = {"role": "assistant"}
    for key in ("content", "reasoning_content"):
        value = draw(st.none() | texts)
        if value is not None or draw(st.booleans()):
            message[key] = value
    if calls or draw(st.booleans()):
        as_string = draw(st.booleans())
        message["tool_calls"] = [
            {
                "type": "function",
                "function": {
                    "name": n,
                    "arguments": json.dumps(a, ensure_ascii=draw(st.booleans())) if as_string else a,
                },
            }
            for n, a in calls
        ]
    return message, calls


def span_of(message: dict, mode: str) -> str:
    segments = render_segments([{"role": "user", "content": "q"}, message], thinking_mode=mode)
    (span,) = [s.text for s in segments if s.message_index == 1]
    return span


def expected_parse(message: dict, calls: list, mode: str) -> dict:
    expected = {"role": "assistant", "content": message.get("content") or ""}
    if mode == "thinking":
        expected["reasoning_content"] = message.get("reasoning_content") or ""
    if calls:
        expected["tool_calls"] = [call(k, n, json.dumps(a, ensure_ascii=False)) for k, (n, a) in enumerate(calls)]
    return expected


@pytest.mark.parametrize("mode", ["thinking", "chat"])
@FAST
@given(example=assistant_messages())
def test_rendered_assistant_span_parses_back_to_the_message(mode, example):
    message, calls = example
    span = span_of(message, mode)
    expected = expected_parse(message, calls, mode)
    for text in (span, span.removesuffix(EOS)):
        assert parse_completion(text, mode) == expected
        assert parse_completion(text, mode, strict=False) == expected
    for (name, original), parsed in zip(calls, expected.get("tool_calls", []), strict=True):
        assert parsed["function"]["name"] == name and json.loads(parsed["function"]["arguments"]) == original


def check_never_raises(text: str) -> None:
    for mode in ("thinking", "chat"):
        result = parse_completion(text, mode, strict=False)
        assert result["role"] == "assistant" and isinstance(result["content"], str)
        try:
            strict = parse_completion(text, mode)
        except DSMLParseError as error:
            assert 0 <= error.offset <= len(text)
            continue
        # what strict accepts, lenient reads the same way (unless lenient found a ReAct action instead)
        if not (result.get("tool_calls") and not strict.get("tool_calls")):
            assert result == strict


MARKUP = [
    EOS, T.THINK_END, T.THINK_START, T.USER, T.TOOL_CALLS_START, T.TOOL_CALLS_END, T.INVOKE_END, T.PARAMETER_END,
    f'<{D}invoke name="', f'<{D}parameter name="', '" string="', 'true">', 'false">', '">\n', D, "\n", "\n\n",
    "Action: f\nAction Input: {}", "Observation:",
]  # fmt: skip


@FAST
@given(text=st.lists(st.one_of(texts, st.sampled_from(MARKUP)), max_size=12).map("".join))
def test_arbitrary_text_never_raises_when_lenient_and_only_dsml_errors_when_strict(text):
    check_never_raises(text)


@FAST
@given(example=assistant_messages(), mode=st.sampled_from(["thinking", "chat"]), data=st.data())
def test_mutated_spans_never_raise_when_lenient_and_only_dsml_errors_when_strict(example, mode, data):
    text = span_of(example[0], mode)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 30)))
        kind = data.draw(st.sampled_from(["delete", "insert", "truncate"]))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + data.draw(st.sampled_from(MARKUP)) + text[i:]
        else:
            text = text[:i]
    check_never_raises(text)


@pytest.mark.parametrize(
    "text",
    [
        "\n\n" + T.TOOL_CALLS_START + "\n" + f'<{D}invoke name="' * 30_000,
        "\n\n" + T.TOOL_CALLS_START + "\n" + (f'<{D}invoke name="f">\n<{D}parameter name="' + '"' * 20) * 10_000,
        block(*[invoke("f", param("a", "x" * 10)) for _ in range(5_000)]),
        "</think>" + ("Action: f\n" + "Action Input: " + "[" * 50 + "\n") * 5_000,
        "<" * 300_000,
    ],
    ids=["open-invokes", "open-parameters", "5000-invokes", "react-lines", "angle-brackets"],
)
def test_large_adversarial_inputs_are_parsed_in_linear_time(text):
    check_never_raises(text)
