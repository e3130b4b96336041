"""Parse the text a DeepSeek-V4 model generates after the prompt into an OpenAI-style assistant message.

The grammar is exactly what `encoder.render_segments` writes for an assistant turn:

    thinking mode:  REASONING "</think>" BODY        (the prompt ended with "<｜Assistant｜><think>")
    chat mode:      BODY                              (the prompt ended with "<｜Assistant｜></think>")
    BODY:           CONTENT ["\\n\\n" CALLS] [EOS]
    CALLS:          "<｜DSML｜tool_calls>\\n" INVOKE ("\\n" INVOKE)* "\\n</｜DSML｜tool_calls>"
    INVOKE:         '<｜DSML｜invoke name="NAME">\\n' PARAMETERS "\\n</｜DSML｜invoke>"
    PARAMETERS:     PARAMETER ("\\n" PARAMETER)*, or nothing
    PARAMETER:      '<｜DSML｜parameter name="KEY" string="true|false">' VALUE "</｜DSML｜parameter>"

REASONING and CONTENT are plain text: no special token and no DSML markup. VALUE is raw text when
`string="true"` and JSON when `string="false"`; it may hold special tokens (not EOS) but no DSML markup.

Decisions:

- The result always has `role` and `content`; `reasoning_content` is present (maybe "") in thinking mode and
  absent in chat mode; `tool_calls` is present only when there are calls.
- Call ids are `call_0`, `call_1`, ... in the order of the calls, unique within one message only (the format has
  no ids; the encoder only matches tool results against the last assistant message's ids).
- `arguments` is `json.dumps(dict, ensure_ascii=False)` of the parsed parameters, in their written order.
- With `tools`, values are typed by the parameter's JSON schema (`type`, a list of types, or `anyOf`/`oneOf`
  of typed schemas): a schema that admits "string" keeps a `string="true"` value as text and keeps a
  `string="false"` value as its raw text when it is not JSON of an admitted type; a `string="true"` value whose
  schema does not admit "string" is converted with `json.loads` when that gives a value of an admitted type.
  A parameter is unknown when the schema lists `properties` without it and `additionalProperties` is not set
  truthy. Nothing else of the schema (required, enum, ...) is checked.
- `strict=False` never raises (for valid arguments) and gives back every character of the output:
  * text after the first EOS is dropped (it is not part of this message);
  * a missing `</think>` in thinking mode gives everything as content, with no tool calls (a truncated
    reasoning may hold drafts of calls that must not be run);
  * a tool-call block that does not parse, or is followed by anything but whitespace, stays verbatim in the
    content and no call is returned (running the calls before the break while dropping the rest is worse
    than running none);
  * inside a well-formed block: an unknown tool or parameter is kept untyped, a duplicate parameter keeps
    its last value, a `string="false"` value that is not JSON is kept as its raw text;
  * without a DSML block, a ReAct action in the content (see `react.py`) is returned as tool calls, with the
    content before the first action (right-stripped) as content;
  * shapes real DeepSeek-V4 output takes outside the grammar, which the serving engines' parsers recover, are
    recovered too: the calls may start with a bare `<｜DSML｜invoke ...>` (no `tool_calls` wrapper), come in several
    `tool_calls` blocks (or bare invokes) separated by whitespace (ids continue across them), and follow the content
    after one newline or none instead of a blank line (one trailing newline is dropped from the content); an invoke
    whose body is a JSON object instead of parameter tags takes that object as its arguments; arguments wrapped in
    a single spurious `arguments` or `input` key (a JSON object, or a parameter tag holding one) are unwrapped when
    the tool's schema makes that unambiguous: the tool is known, does not declare that key, and declares every key
    inside (a tool that really has an `arguments` parameter keeps it); a scalar text so wrapped (a JSON value or a
    parameter tag) is the tool's one required parameter when the schema has exactly one and it is a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import tokens as T
from .react import AgentKeyword, action_offset, openai_tool_call, parse_react

__all__ = ["DSMLParseError", "parse_completion"]

_INVOKE_START = f'<{T.DSML}invoke name="'
_PARAMETER_START = f'<{T.DSML}parameter name="'
_STRING_FLAG = '" string="'
_NEXT_INVOKE, _BLOCK_END = "\n" + _INVOKE_START, "\n" + T.TOOL_CALLS_END
_NEXT_PARAMETER, _INVOKE_CLOSE = "\n" + _PARAMETER_START, "\n" + T.INVOKE_END
# Special tokens and DSML markup, found left to right in one pass. Only literals: no backtracking.
_MARKUP = re.compile("|".join(re.escape(t) for t in T.SPECIAL_TOKENS) + f"|(?:</?)?{re.escape(T.DSML)}")
# JSON schema type -> the Python types of `json.loads` results it admits (bool is not an integer here).
_SCHEMA_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


class DSMLParseError(ValueError):
    """Model output that does not follow the DeepSeek-V4 assistant format.

    Args:
        problem: what was expected at `offset` (kept as `problem`).
        offset: the character offset in the parsed text (kept as `offset`).
        text: the parsed text; the message quotes up to 40 characters of it from `offset`.
    """

    def __init__(self, problem: str, offset: int, text: str = ""):
        self.problem = problem
        self.offset = offset
        found = repr(text[offset : offset + 40]) if offset < len(text) else "the end of the text"
        super().__init__(f"offset {offset}: {problem}; found {found}")


def parse_completion(
    text: str,
    thinking_mode: str = "thinking",
    tools: Sequence[Mapping] | None = None,
    strict: bool = True,
    keywords: AgentKeyword | None = None,
) -> dict:
    """Parse generated text (after `<｜Assistant｜><think>` or `<｜Assistant｜></think>`, with or without the final
    EOS) into `{"role": "assistant", "content", "reasoning_content" (thinking mode), "tool_calls" (if any)}`.

    Args:
        text: the generated text.
        thinking_mode: "thinking" or "chat", as the prompt was rendered.
        tools: OpenAI tool dicts; when given, parameter values are typed by their schema and, in strict mode,
            unknown tools and parameters are errors.
        strict: raise `DSMLParseError` on malformed output; when False, never raise and keep what does not
            parse as content (see the module docstring).
        keywords: the ReAct keywords of the non-strict fallback (default `AgentKeyword()`).

    Raises:
        DSMLParseError: (strict only) with the character offset of the problem.
        ValueError: `thinking_mode` is not "thinking" or "chat".
    """
    if thinking_mode not in T.THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {T.THINKING_MODES}, got {thinking_mode!r}")
    index = _tool_index(tools)
    thinking = thinking_mode == "thinking"
    if strict:
        return _parse_strict(text, thinking, index)
    return _parse_lenient(text, thinking, index, keywords or AgentKeyword())


def _message(content: str, reasoning: str | None, calls: list[dict]) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def _parse_strict(text: str, thinking: bool, tools: dict | None) -> dict:
    eos = text.find(T.EOS)
    end = len(text) if eos < 0 else eos
    pos, reasoning = 0, None
    if thinking:
        found = _MARKUP.search(text, 0, end)
        if found is None:
            raise DSMLParseError(f"expected {T.THINK_END!r} to end the reasoning", end, text)
        if found.group() != T.THINK_END:
            raise DSMLParseError(f"expected plain reasoning text and {T.THINK_END!r}", found.start(), text)
        reasoning, pos = text[: found.start()], found.end()
    calls: list[dict] = []
    found = _MARKUP.search(text, pos, end)
    if found is None:
        content = text[pos:end]
    elif text.startswith(T.TOOL_CALLS_START, found.start(), end):
        start = found.start()
        if start - 2 < pos or text[start - 2 : start] != "\n\n":
            raise DSMLParseError(f'expected a blank line ("\\n\\n") before {T.TOOL_CALLS_START!r}', start, text)
        content = text[pos : start - 2]
        parser = _BlockParser(text, end, tools, strict=True)
        calls = parser.block(start)
        if parser.pos != end:
            raise DSMLParseError(f"expected {T.EOS!r} or the end of the output after the tool calls", parser.pos, text)
    else:
        raise DSMLParseError("expected plain content text, a tool-call block or EOS", found.start(), text)
    if eos >= 0 and eos + len(T.EOS) < len(text):
        raise DSMLParseError(f"expected nothing after {T.EOS!r}", eos + len(T.EOS), text)
    return _message(content, reasoning, calls)


def _parse_lenient(text: str, thinking: bool, tools: dict | None, keywords: AgentKeyword) -> dict:
    eos = text.find(T.EOS)
    end = len(text) if eos < 0 else eos
    if thinking:
        think_end = text.find(T.THINK_END, 0, end)
        if think_end < 0:
            return _message(text[:end], "", [])
        reasoning, pos = text[:think_end], think_end + len(T.THINK_END)
    else:
        reasoning, pos = None, 0
    content = text[pos:end]
    starts = [
        found for found in (text.find(T.TOOL_CALLS_START, pos, end), text.find(_INVOKE_START, pos, end)) if found >= 0
    ]
    if not starts:
        calls = parse_react(content, keywords)
        if calls:
            content = content[: action_offset(content, keywords)].rstrip()
        return _message(content, reasoning, calls)
    start = min(starts)
    parser = _BlockParser(text, end, tools, strict=False)
    try:
        calls = parser.calls(start)
    except DSMLParseError:
        return _message(content, reasoning, [])
    if text[parser.pos : end].strip():
        return _message(content, reasoning, [])
    preamble = text[pos:start]
    preamble = preamble[:-2] if preamble.endswith("\n\n") else preamble.removesuffix("\n")
    return _message(preamble, reasoning, calls)


class _BlockParser:
    """Recursive-descent parser of one DSML tool-call block; `pos` is the cursor in `text[:end]`."""

    def __init__(self, text: str, end: int, tools: dict | None, strict: bool):
        self.text, self.end, self.tools, self.strict = text, end, tools, strict
        self.pos = 0

    def fail(self, problem: str, offset: int | None = None) -> NoReturn:
        raise DSMLParseError(problem, self.pos if offset is None else offset, self.text)

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos, self.end)

    def expect(self, literal: str, what: str | None = None) -> None:
        if not self.at(literal):
            self.fail(f"expected {what or repr(literal)}")
        self.pos += len(literal)

    def next_markup(self) -> int:
        """Where the next DSML marker starts (or `end`): headers and values never extend past it."""
        found = self.text.find(T.DSML, self.pos, self.end)
        return self.end if found < 0 else found

    def tag_start(self, marker: int) -> int:
        """The offset of the `<` or `</` that opens the tag around the DSML marker at `marker`."""
        for opener in ("</", "<"):
            if marker - len(opener) >= self.pos and self.text.startswith(opener, marker - len(opener)):
                return marker - len(opener)
        return marker

    def block(self, start: int, first: int = 0) -> list[dict]:
        """One `tool_calls` block at `start`; its calls are numbered from `first`."""
        self.pos = start
        self.expect(T.TOOL_CALLS_START + "\n")
        calls = [self.invoke(first)]
        while self.at(_NEXT_INVOKE):
            self.pos += 1
            calls.append(self.invoke(first + len(calls)))
        self.expect(_BLOCK_END, f"{_NEXT_INVOKE!r} or {_BLOCK_END!r}")
        return calls

    def calls(self, start: int) -> list[dict]:
        """(lenient) `tool_calls` blocks and bare invokes from `start`, separated by whitespace, until anything
        else; `pos` ends after the last one."""
        calls: list[dict] = []
        self.pos = start
        while True:
            if self.at(T.TOOL_CALLS_START):
                calls += self.block(self.pos, len(calls))
            elif self.at(_INVOKE_START):
                calls.append(self.invoke(len(calls)))
            else:
                break
            after = self.pos
            while self.pos < self.end and self.text[self.pos].isspace():
                self.pos += 1
            if not (self.at(T.TOOL_CALLS_START) or self.at(_INVOKE_START)):
                self.pos = after
                break
        return calls

    def invoke(self, k: int) -> dict:
        self.expect(_INVOKE_START)
        name_at = self.pos
        close = self.text.find('">\n', name_at, self.next_markup())
        if close <= name_at:
            self.fail("expected a tool name and '\">\\n'")
        name = self.text[name_at:close]
        self.pos = close + 3
        schema = self.tool_schema(name, name_at)
        arguments: dict[str, Any] = {}
        if not self.strict and not self.at(_PARAMETER_START) and not self.at(_INVOKE_CLOSE):
            arguments = _unwrapped(self.json_body(), schema)
            self.expect(T.INVOKE_END)
            return openai_tool_call(k, name, arguments)
        if not self.at(_INVOKE_CLOSE):
            self.parameter(arguments, name, schema)
            while self.at(_NEXT_PARAMETER):
                self.pos += 1
                self.parameter(arguments, name, schema)
        if not self.strict:
            arguments = _unwrapped(arguments, schema)
        self.expect(_INVOKE_CLOSE, f"{_NEXT_PARAMETER!r} or {_INVOKE_CLOSE!r}")
        return openai_tool_call(k, name, arguments)

    def json_body(self) -> dict[str, Any]:
        """(lenient) An invoke body that is a JSON object instead of parameter tags, up to the invoke's close."""
        close = self.next_markup() - len("</")
        if close < self.pos or not self.text.startswith(T.INVOKE_END, close, self.end):
            self.fail(f"expected parameter tags or a JSON object, then {T.INVOKE_END!r}")
        ok, value, _ = _loads(self.text[self.pos : close])
        if not ok or not isinstance(value, dict):
            self.fail("expected parameter tags or a JSON object")
        self.pos = close
        return value

    def parameter(self, arguments: dict, tool: str, schema: Any) -> None:
        self.expect(_PARAMETER_START)
        key_at = self.pos
        marker = self.next_markup()
        flag = self.text.find(_STRING_FLAG, key_at, marker)
        if flag < 0:
            self.fail(f"expected a parameter name and {_STRING_FLAG!r}")
        key = self.text[key_at:flag]
        self.pos = flag + len(_STRING_FLAG)
        is_string = self.at('true">')
        if not is_string:
            self.expect('false">', "'true\">' or 'false\">'")
        else:
            self.pos += len('true">')
        if key in arguments and self.strict:
            self.fail(f"duplicate parameter {key!r} in the call of {tool!r}", key_at)
        value_schema = self.parameter_schema(schema, tool, key, key_at)
        value_at, value_end = self.pos, marker - 2
        if marker == self.end:
            self.fail(f"expected {T.PARAMETER_END!r} to end the value of {key!r}", self.end)
        if value_end < value_at or not self.text.startswith(T.PARAMETER_END, value_end, self.end):
            self.fail(f"expected {T.PARAMETER_END!r} to end the value of {key!r}", self.tag_start(marker))
        arguments[key] = self.value(self.text[value_at:value_end], is_string, value_schema, key, value_at)
        self.pos = value_end + len(T.PARAMETER_END)

    def tool_schema(self, name: str, at: int) -> Any:
        """The parameters schema of tool `name`; None when untyped."""
        if self.tools is None:
            return None
        if name not in self.tools and self.strict:
            self.fail(f"unknown tool {name!r}; expected one of {sorted(self.tools)}", at)
        return self.tools.get(name)

    def parameter_schema(self, schema: Any, tool: str, key: str, at: int) -> Any:
        if not isinstance(schema, Mapping) or not isinstance(schema.get("properties"), Mapping):
            return None
        properties = schema["properties"]
        if key in properties:
            return properties[key]
        extra = schema.get("additionalProperties")
        if not extra and self.strict:
            self.fail(f"unknown parameter {key!r} of tool {tool!r}; expected one of {list(properties)}", at)
        return extra if isinstance(extra, Mapping) else None

    def value(self, raw: str, is_string: bool, schema: Any, key: str, at: int) -> Any:
        types = _schema_types(schema)
        if is_string and (types is None or "string" in types):
            return raw
        ok, value, error_at = _loads(raw)
        if ok and (types is None or _admits(types, value)):
            return value
        if is_string or (types is not None and "string" in types):
            return raw
        if ok:  # JSON of a type the schema does not admit: the schema is not validated
            return value
        if self.strict:
            self.fail(f'expected JSON for the string="false" value of {key!r}', at + error_at)
        return raw


_WRAPPERS = ("arguments", "input")


def _unwrapped(arguments: dict[str, Any], schema: Any) -> dict[str, Any]:
    """`arguments` without a spurious single wrapper key (`arguments` / `input`), when `schema` makes it unambiguous
    (it declares its properties, not the wrapper): holding an object or the JSON text of one whose every key the schema
    declares, that object; holding any other text, for a tool with exactly one required parameter, a string one
    (`{"arguments": "cd /x && ls"}` for a tool that requires `command`), that text as that parameter."""
    if len(arguments) != 1 or not isinstance(schema, Mapping) or not isinstance(schema.get("properties"), Mapping):
        return arguments
    (key, inner), properties = next(iter(arguments.items())), schema["properties"]
    if key not in _WRAPPERS or key in properties:
        return arguments
    text = inner if isinstance(inner, str) else None
    if text is not None:
        ok, inner, _ = _loads(text)
        if not ok or not isinstance(inner, dict):
            return _as_the_one_required_string(text, schema) or arguments
    if not isinstance(inner, dict) or not inner or any(k not in properties for k in inner):
        return arguments
    return inner


def _as_the_one_required_string(text: str, schema: Mapping) -> dict[str, Any] | None:
    """`{name: text}` when `schema` requires exactly one parameter, `name`, and it is a string; else None (nothing
    says where the text belongs)."""
    required = schema.get("required")
    if isinstance(required, list) and len(required) == 1 and required[0] in schema["properties"]:
        types = _schema_types(schema["properties"][required[0]])
        if types is not None and "string" in types:
            return {required[0]: text}
    return None


def _loads(raw: str) -> tuple[bool, Any, int]:
    """(ok, value, error offset in raw): strict JSON (no NaN/Infinity), never raising."""
    try:
        return True, json.loads(raw, parse_constant=_reject_constant), 0
    except json.JSONDecodeError as err:
        return False, None, err.pos
    except (ValueError, RecursionError):  # NaN/Infinity, too many digits, nesting too deep
        return False, None, 0


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _schema_types(schema: Any) -> frozenset[str] | None:
    """The JSON types a schema admits, or None when it does not say."""
    if not isinstance(schema, Mapping):
        return None
    declared = schema.get("type")
    if isinstance(declared, str):
        return frozenset([declared])
    if isinstance(declared, list):
        return frozenset(t for t in declared if isinstance(t, str)) or None
    alternatives = [s for key in ("anyOf", "oneOf") if isinstance(schema.get(key), list) for s in schema[key]]
    types = [_schema_types(s) for s in alternatives]
    if not types or any(t is None for t in types):
        return None
    return frozenset().union(*types)


def _admits(types: frozenset[str], value: Any) -> bool:
    if isinstance(value, bool):
        return "boolean" in types
    return any(isinstance(value, _SCHEMA_TYPES.get(t, ())) for t in types)


def _tool_index(tools: Any) -> dict[str, Any] | None:
    """tool name -> parameters schema, from OpenAI tool dicts (or bare function dicts); malformed entries skipped."""
    if tools is None:
        return None
    index = {}
    for tool in tools if isinstance(tools, Sequence) else ():
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            index[function["name"]] = function.get("parameters")
    return index
