"""Hypothesis strategies for valid DeepSeek-V4 conversations (valid as `encoder.validate_messages` defines it).

`conversations()` draws `(messages, tools)`: OpenAI-style messages over every role, and a `tools` list for the
`apply_chat_template(..., tools=...)` argument or None. `assistant_messages()` draws one assistant message.
Tool-call arguments are drawn as dicts and as JSON strings written every way `json.dumps` can write them.
"""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

from hf_dsv4.template.tokens import TASK_TOKENS

__all__ = [
    "assistant_messages",
    "conversations",
    "json_argument_strings",
    "json_values",
    "texts",
    "tool_calls",
    "tools_lists",
]

# Characters that stress the format: CJK, emoji (non-BMP), combining marks, quotes, backslashes, newlines, tabs,
# JSON/DSML/HTML punctuation, a control character, U+2028 and DEL.
_SPECIAL_CHARS = "中文字😀🎉𝄞é\u0301\"'\\\n\t\r/<>&{}[]:,｜▁\x01\u2028\x7f "
_ALPHABET = st.one_of(
    st.sampled_from(_SPECIAL_CHARS),
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
    st.sampled_from("abcxyz0123 "),
)

texts = st.text(_ALPHABET, max_size=12)
"""Short strings, empty included, over an alphabet that stresses the format."""

_keys = st.text(_ALPHABET, max_size=6)
_floats = st.one_of(
    st.sampled_from([1.5, 1e20, -0.0, 0.0, 1e-7, 123456789.125, -2.5e-300, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), _floats, texts)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=8,
)
"""Any value `json.dumps` can write (NaN and infinities included, as json.loads reads them back)."""

_arguments = st.dictionaries(_keys, json_values, max_size=4)


@st.composite
def json_argument_strings(draw, arguments=_arguments) -> str:
    """A JSON-object string as `json.dumps` writes it: ASCII-escaped or not, compact, default or indented."""
    value = draw(arguments)
    layout = draw(
        st.sampled_from(
            [
                {},
                {"separators": (",", ":")},
                {"indent": 2},
                {"indent": "\t", "separators": (" ,", " :  ")},
                {"indent": 0},
            ]
        )
    )
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), **layout)
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "\n", "\r\n\t"])) + text + draw(st.sampled_from(["", " ", "\n "]))
    if draw(st.booleans()):
        # "/" only occurs inside strings in JSON text, and "\/" is the escape json.dumps never writes
        text = text.replace("/", "\\/")
    return text


_names = st.text(st.sampled_from("abcdefgh_中"), min_size=1, max_size=8)
_call_ids = st.sampled_from(["call_0", "call_1", "call_2", "call_3", "x", "调用"])


@st.composite
def tool_calls(draw) -> list[dict]:
    """1-3 tool calls; ids distinct or absent; arguments a dict, a JSON string, or missing."""
    ids = draw(st.lists(_call_ids, min_size=3, max_size=3, unique=True))
    calls = []
    for k in range(draw(st.integers(1, 3))):
        function = {"name": draw(_names)}
        form = draw(st.sampled_from(["dict", "string", "string", "missing"]))
        if form == "dict":
            function["arguments"] = draw(_arguments)
        elif form == "string":
            function["arguments"] = draw(json_argument_strings())
        call = {"type": "function", "function": function}
        if draw(st.integers(0, 4)):
            call["id"] = ids[k]
        calls.append(call)
    return calls


@st.composite
def assistant_messages(draw, calls: bool | None = None) -> dict:
    """An assistant message: content, reasoning and tool calls each present, empty, None or missing; maybe wo_eos.
    `calls` forces tool calls on (True) or off (False)."""
    message = {"role": "assistant"}
    for key in ("content", "reasoning_content"):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            message[key] = None
        elif choice < 5:
            message[key] = draw(texts)
    if calls or (calls is None and draw(st.booleans())):
        message["tool_calls"] = draw(tool_calls())
    if draw(st.integers(0, 5)) == 0:
        message["wo_eos"] = True
    return message


@st.composite
def _tool(draw) -> dict:
    function = {
        "name": draw(_names),
        "description": draw(texts),
        "parameters": {"type": "object", "properties": {draw(_keys): {"type": "string"}}},
    }
    return function if draw(st.integers(0, 3)) == 0 else {"type": "function", "function": function}


tools_lists = st.lists(_tool(), min_size=1, max_size=2)
"""OpenAI-format tool lists (some tools given as a bare function dict)."""


def _text_or_missing(draw, message: dict, key: str = "content") -> dict:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        message[key] = None
    elif choice < 5:
        message[key] = draw(texts)
    return message


@st.composite
def _tool_result(draw, ids: list[str]) -> dict:
    message = {"role": "tool"}
    if ids and draw(st.integers(0, 4)):
        message["tool_call_id"] = draw(st.sampled_from(ids))
    if draw(st.integers(0, 5)) == 0:
        blocks = [{"type": "text", "text": draw(texts)}, {"type": draw(st.sampled_from(["text", "image", "audio"]))}]
        message["content"] = draw(st.lists(st.sampled_from(blocks), max_size=3))
        return message
    return _text_or_missing(draw, message)


@st.composite
def conversations(draw, max_messages: int = 9) -> tuple[list[dict], list[dict] | None]:
    """A valid conversation and a `tools` argument (or None): 1 to `max_messages` messages over every role."""
    messages: list[dict] = []
    if draw(st.booleans()):
        system = _text_or_missing(draw, {"role": "system"})
        if draw(st.integers(0, 3)) == 0:
            system["tools"] = draw(tools_lists)
        if draw(st.integers(0, 4)) == 0:
            system["response_format"] = {"type": "json_object", "schema": {"answer": draw(texts)}}
        messages.append(system)
    ids: list[str] | None = None  # call ids of the last assistant message, None if it made no calls
    for _ in range(draw(st.integers(1, max_messages - len(messages)))):
        roles = ["user", "user", "assistant", "assistant", "developer", "latest_reminder"]
        if ids is not None:
            roles += ["tool"] * 4
        role = draw(st.sampled_from(roles))
        if role == "user":
            message = _text_or_missing(draw, {"role": "user"})
            if draw(st.integers(0, 4)) == 0:
                message["task"] = draw(st.sampled_from(list(TASK_TOKENS)))
        elif role == "assistant":
            message = draw(assistant_messages())
            calls = message.get("tool_calls") or []
            ids = [c["id"] for c in calls if c.get("id")] if calls else None
            if calls and draw(st.booleans()):
                # the results of the calls, as a batch in any order (some without an id)
                messages.append(message)
                for call_id in draw(st.permutations(ids)):
                    result = draw(_tool_result(ids))
                    messages.append({**result, "tool_call_id": call_id} if "tool_call_id" in result else result)
                message = draw(_tool_result(ids))
        elif role == "tool":
            message = draw(_tool_result(ids))
        elif role == "developer":
            message = {"role": "developer", "content": draw(texts.filter(bool))}
            if draw(st.integers(0, 3)) == 0:
                message["tools"] = draw(tools_lists)
        else:
            message = {"role": "latest_reminder", "content": draw(texts)}
        messages.append(message)
    tools = draw(st.one_of(st.none(), tools_lists))
    return messages, tools
