"""Render a conversation to DeepSeek-V4 prompt text, byte for byte as DeepSeek's reference encoder does.

The rules, in the order they are applied (each is tested in `tests/test_encoder.py`):

1. `tool` messages are folded into user turns as `<tool_result>...</tool_result>` blocks; a user message that
   directly follows a user turn (without a quick-instruction `task`) joins it, blocks separated by a blank line.
2. Tool results inside one user turn are re-ordered to the order of the calls of the last assistant message
   that made calls (matched by `tool_call_id`).
3. In thinking mode with `drop_thinking=True` and no `tools` anywhere, messages before the last user/developer
   message lose their reasoning (assistant) or are removed (developer).
4. Each message is rendered; a user/developer turn followed by an assistant (or at the end) gets the generation
   transition `<｜Assistant｜>` + `<think>` (thinking, current turn) or `</think>`; a `task` turns it into a
   quick-instruction token instead.

Where DeepSeek's reference accepts input it cannot render faithfully (a tool-call `arguments` dict, arguments
that are not a JSON object, unknown roles), this module either renders the evident intent (a dict renders
exactly as the same arguments given as a JSON string) or raises `ChatFormatError` naming the message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from . import tokens as T

__all__ = ["ChatFormatError", "Segment", "attach_tools", "encode_messages", "render_segments", "tool_call_arguments"]

_KEEP_ROLES_WHEN_DROPPING = {"user", "system", "tool", "latest_reminder"}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered in the DeepSeek-V4 format; says which message and why.

    Args:
        problem: what is wrong (kept as `problem`).
        index: the message's index in the caller's list (kept as `index`; None for an option).
    """

    def __init__(self, problem: str, index: int | None = None):
        self.index = index
        self.problem = problem
        super().__init__(problem if index is None else f"message {index}: {problem}")


class Segment(NamedTuple):
    """A piece of rendered text.

    Args:
        text: the text.
        message_index: the index, in the caller's list (context excluded), of the assistant message whose trainable
            span this is, or None for prompt text.
    """

    text: str
    message_index: int | None


def to_json(value: Any) -> str:
    """JSON as the format writes it: `json.dumps` with `ensure_ascii=False` and default separators."""
    return json.dumps(value, ensure_ascii=False)


def tool_call_arguments(arguments: Any, index: int | None = None) -> dict:
    """The arguments of a tool call as a dict.

    Args:
        arguments: a JSON-object string or a mapping.
        index: the message index the error names.

    Returns:
        A new dict.

    Raises:
        ChatFormatError: invalid JSON, or not a JSON object, string or mapping.
    """
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError as err:  # JSONDecodeError, and e.g. integers beyond Python's digit limit
            raise ChatFormatError(
                f"tool call arguments are not valid JSON ({err}): {arguments[:80]!r}", index
            ) from None
        if isinstance(value, dict):
            return value
        raise ChatFormatError(f"tool call arguments must be a JSON object, got {type(value).__name__}", index)
    raise ChatFormatError(
        f"tool call arguments must be a JSON-object string or a dict, got {type(arguments).__name__}", index
    )


def attach_tools(messages: Sequence[Mapping], tools: Sequence[Mapping] | None) -> list[Mapping]:
    """`messages` with `tools` appended to the leading system message's own tools, inserting an empty system
    message when there is none: what `apply_chat_template(messages, tools=tools)` renders.

    Args:
        messages: OpenAI-style messages (never mutated).
        tools: tool schemas; None or empty leaves the messages as they are.

    Returns:
        A new list of messages.
    """
    messages = list(messages)
    if not tools:
        return messages
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "tools": [*(messages[0].get("tools") or []), *tools]}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": list(tools)}, *messages]


# ----------------------------------------------------------------------------------------------------------
# Validation: every problem is found before anything is rendered, and named by message index.
# ----------------------------------------------------------------------------------------------------------


def _check_text(msg: Mapping, key: str, index: int, role: str) -> None:
    value = msg.get(key)
    if value is not None and not isinstance(value, str):
        raise ChatFormatError(
            f"{role} `{key}` must be a string or None, got {type(value).__name__} (content-part lists are only "
            "rendered for tool results)",
            index,
        )


def _check_tool_content(content: Any, index: int) -> None:
    if content is None or isinstance(content, str):
        return
    if isinstance(content, list) and all(isinstance(b, Mapping) for b in content):
        for block in content:
            if block.get("type") == "text" and not isinstance(block.get("text", ""), str):
                raise ChatFormatError("tool result text block has a non-string `text`", index)
        return
    raise ChatFormatError(
        f"tool `content` must be a string, None or a list of content blocks, got {type(content).__name__}", index
    )


def _check_tools(tools: Any, index: int) -> None:
    if not isinstance(tools, list):
        raise ChatFormatError(f"`tools` must be a list of OpenAI tool dicts, got {type(tools).__name__}", index)
    for k, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(_tool_function(tool), Mapping):
            raise ChatFormatError(f"tools[{k}] must be a dict like {{'type': 'function', 'function': {{...}}}}", index)


def _tool_function(tool: Mapping) -> Any:
    return tool["function"] if "function" in tool else tool


def _call_ids(msg: Mapping) -> list[str]:
    ids = []
    for call in msg.get("tool_calls") or []:
        call_id = call.get("id") or (call.get("function") or {}).get("id", "")
        if call_id:
            ids.append(call_id)
    return ids


def _check_tool_calls(calls: Any, index: int) -> None:
    if not isinstance(calls, list):
        raise ChatFormatError(f"`tool_calls` must be a list, got {type(calls).__name__}", index)
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ChatFormatError(
                f"tool_calls[{k}] must have `function.name` (a string) and `function.arguments`", index
            )
        try:
            tool_call_arguments(function.get("arguments", "{}"), index)
        except ChatFormatError as err:
            raise ChatFormatError(f"tool_calls[{k}] ({function['name']}): {err.problem}", index) from None


def validate_messages(messages: Sequence[Any], context: Sequence[Any] = ()) -> None:
    """Raise `ChatFormatError` for the first message that cannot be rendered.

    Indices in errors count in `messages`; context messages get negative indices (-1 is the last one)."""
    for name, value in (("messages", messages), ("context", context)):
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise ChatFormatError(f"{name} must be a list of dicts, got {type(value).__name__}")
    last_assistant: Mapping | None = None
    for i, msg in enumerate([*context, *messages], start=-len(context)):
        if not isinstance(msg, Mapping):
            raise ChatFormatError(f"must be a dict, got {type(msg).__name__}", i)
        role = msg.get("role")
        if role not in T.ROLES:
            raise ChatFormatError(f"unknown role {role!r}; expected one of {', '.join(T.ROLES)}", i)
        if role == "tool":
            _check_tool_content(msg.get("content"), i)
        else:
            _check_text(msg, "content", i, role)
        if msg.get("tools"):
            if role not in ("system", "developer"):
                raise ChatFormatError(f"`tools` can only be attached to a system or developer message, not {role}", i)
            _check_tools(msg["tools"], i)
        if msg.get("task") is not None and msg["task"] not in T.TASK_TOKENS:
            raise ChatFormatError(f"unknown task {msg['task']!r}; expected one of {', '.join(T.TASK_TOKENS)}", i)
        if role == "developer" and not msg.get("content"):
            raise ChatFormatError("developer message has empty content", i)
        if role == "latest_reminder" and not isinstance(msg.get("content"), str):
            raise ChatFormatError("latest_reminder message needs string content", i)
        if role == "assistant":
            _check_text(msg, "reasoning_content", i, role)
            if msg.get("tool_calls"):
                _check_tool_calls(msg["tool_calls"], i)
            last_assistant = msg
        if role == "tool":
            if last_assistant is None or not last_assistant.get("tool_calls"):
                raise ChatFormatError(
                    "tool message has no matching call: no earlier assistant message made tool calls", i
                )
            call_id = msg.get("tool_call_id")
            if call_id and call_id not in _call_ids(last_assistant):
                raise ChatFormatError(
                    f"tool message has no matching call: tool_call_id {call_id!r} is not among the ids of the last "
                    f"assistant tool calls {_call_ids(last_assistant)}",
                    i,
                )


# ----------------------------------------------------------------------------------------------------------
# Pre-processing: fold tool results into user turns, order them, drop old reasoning.
# ----------------------------------------------------------------------------------------------------------


def _merge_tool_messages(messages: Iterable[Mapping], offset: int) -> list[dict]:
    merged: list[dict] = []
    for i, msg in enumerate(messages, start=offset):
        role = msg["role"]
        prev = merged[-1] if merged else None
        if role == "tool":
            block = {"type": "tool_result", "id": msg.get("tool_call_id") or "", "content": msg.get("content")}
            if prev is not None and "blocks" in prev:
                prev["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block], "_index": i})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content") or ""}
            if prev is not None and "blocks" in prev and prev.get("task") is None:
                prev["blocks"].append(block)
            else:
                new = {"role": "user", "blocks": [block], "_index": i}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        new[key] = msg[key]
                merged.append(new)
        else:
            merged.append({**msg, "_index": i})
    return merged


def _sort_tool_results(messages: list[dict]) -> None:
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {call_id: k for k, call_id in enumerate(_call_ids(msg))}
        elif msg["role"] == "user" and "blocks" in msg:
            results = [b for b in msg["blocks"] if b["type"] == "tool_result"]
            if len(results) > 1 and order:
                ordered = iter(sorted(results, key=lambda b: order.get(b["id"], 0)))
                msg["blocks"] = [next(ordered) if b["type"] == "tool_result" else b for b in msg["blocks"]]


def _last_user_index(messages: Sequence[Mapping]) -> int:
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx]["role"] in ("user", "developer"):
            return idx
    return -1


def _drop_thinking(messages: list[dict]) -> list[dict]:
    last_user = _last_user_index(messages)
    kept = []
    for idx, msg in enumerate(messages):
        if msg["role"] in _KEEP_ROLES_WHEN_DROPPING or idx >= last_user:
            kept.append(msg)
        elif msg["role"] == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
        # developer messages before the last user turn are dropped
    return kept


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def render_tools(tools: Sequence[Mapping]) -> str:
    """The tools block appended to a system or developer message."""
    return T.TOOLS_HEADER + "\n".join(to_json(_tool_function(t)) for t in tools) + T.TOOLS_FOOTER


def render_tool_calls(tool_calls: Sequence[Mapping]) -> str:
    """The DSML block of an assistant message's tool calls, including its leading blank line."""
    invokes = []
    for call in tool_calls:
        function = call["function"]
        params = []
        for key, value in tool_call_arguments(function.get("arguments", "{}")).items():
            is_str = isinstance(value, str)
            params.append(
                f'<{T.DSML}parameter name="{key}" string="{"true" if is_str else "false"}">'
                f"{value if is_str else to_json(value)}{T.PARAMETER_END}"
            )
        invokes.append(f'<{T.DSML}invoke name="{function["name"]}">\n' + "\n".join(params) + f"\n{T.INVOKE_END}")
    return "\n\n" + T.TOOL_CALLS_START + "\n" + "\n".join(invokes) + "\n" + T.TOOL_CALLS_END


def _render_tool_result(content: Any) -> str:
    if isinstance(content, list):
        content = "\n\n".join(
            b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]" for b in content
        )
    return T.TOOL_RESULT_START + (content or "") + T.TOOL_RESULT_END


def _system_extras(msg: Mapping) -> str:
    text = ""
    if msg.get("tools"):
        text += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        text += "\n\n" + T.RESPONSE_FORMAT_HEADER + to_json(msg["response_format"])
    return text


def _render_assistant(i: int, messages: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    msg = messages[i]
    prev_has_task = i > 0 and messages[i - 1].get("task") is not None
    reasoning = ""
    if thinking and not prev_has_task and (not drop or i > last_user):
        reasoning = (msg.get("reasoning_content") or "") + T.THINK_END
    calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
    return reasoning + (msg.get("content") or "") + calls + ("" if msg.get("wo_eos") else T.EOS)


def _render_body(i: int, messages: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    msg = messages[i]
    role = msg["role"]
    if role == "system":
        return (msg.get("content") or "") + _system_extras(msg)
    if role == "developer":
        return T.USER + msg["content"] + _system_extras(msg)
    if role == "user":
        parts = [b["text"] if b["type"] == "text" else _render_tool_result(b["content"]) for b in msg["blocks"]]
        return T.USER + "\n\n".join(parts)
    if role == "latest_reminder":
        return T.LATEST_REMINDER + msg["content"]
    return _render_assistant(i, messages, thinking, drop, last_user)


def _render_transition(i: int, messages: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    if i + 1 < len(messages) and messages[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    msg = messages[i]
    task = msg.get("task")
    if task is not None:
        if task != "action":
            return T.TASK_TOKENS[task]
        return T.ASSISTANT + (T.THINK_START if thinking else T.THINK_END) + T.TASK_TOKENS[task]
    if msg["role"] in ("user", "developer"):
        return T.ASSISTANT + (T.THINK_START if thinking and (not drop or i >= last_user) else T.THINK_END)
    return ""


def effort_prefix(reasoning_effort: str | None, effort_profile: str = T.DEFAULT_EFFORT_PROFILE) -> str:
    """The text a prompt in thinking mode starts with (after BOS) for `reasoning_effort` under `effort_profile`
    ("0424": None, "high" or "max", only "max" adds text; "0731": None meaning "low", "high" or "max").

    Args:
        reasoning_effort: the effort; None for the profile's default.
        effort_profile: "0424" or "0731", as in `encode_messages`.

    Returns:
        The prefix text ("" when the effort adds none).

    Raises:
        ChatFormatError: an unknown profile, or an effort the profile does not have.
    """
    if effort_profile not in T.EFFORT_PROFILES:
        raise ChatFormatError(f"effort_profile must be one of {tuple(T.EFFORT_PROFILES)}, got {effort_profile!r}")
    table = T.EFFORT_PROFILES[effort_profile]
    effort = T.DEFAULT_REASONING_EFFORT[effort_profile] if reasoning_effort is None else reasoning_effort
    if effort not in table:
        raise ChatFormatError(
            f"reasoning_effort must be one of {tuple(table)} under the {effort_profile} effort profile, got "
            f"{reasoning_effort!r}"
        )
    return table[effort]


def check_options(thinking_mode: str, reasoning_effort: str | None, effort_profile: str) -> str:
    """Validate the options; returns the reasoning-effort text."""
    if thinking_mode not in T.THINKING_MODES:
        raise ChatFormatError(f"thinking_mode must be one of {T.THINKING_MODES}, got {thinking_mode!r}")
    return effort_prefix(reasoning_effort, effort_profile)


def render_segments(
    messages: Sequence[Mapping],
    thinking_mode: str = "thinking",
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    add_default_bos_token: bool = True,
    context: Sequence[Mapping] | None = None,
    effort_profile: str = T.DEFAULT_EFFORT_PROFILE,
) -> list[Segment]:
    """Like `encode_messages`, but returns the text as segments that tell prompt text from each assistant
    message's trainable span (its rendering: reasoning, `</think>`, content, DSML calls and EOS).

    Args:
        messages, thinking_mode, drop_thinking, reasoning_effort, add_default_bos_token, context, effort_profile:
            as in `encode_messages`.

    Returns:
        The segments in order; their texts joined are `encode_messages`'s text.

    Raises:
        ChatFormatError: a malformed conversation (naming the message) or an unknown option.
    """
    effort_text = check_options(thinking_mode, reasoning_effort, effort_profile)
    context = list(context or [])
    validate_messages(messages, context=context)
    merged_context = _merge_tool_messages(context, -len(context))
    full = merged_context + _merge_tool_messages(messages, 0)
    _sort_tool_results(full)

    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking and drop:
        full = _drop_thinking(full)
        first = len(_drop_thinking(merged_context))
    else:
        first = len(merged_context)
    last_user = _last_user_index(full)

    segments = [Segment(T.BOS, None)] if add_default_bos_token and not context else []
    if first == 0 and thinking and effort_text and full:
        segments.append(Segment(effort_text, None))
    for i in range(first, len(full)):
        is_assistant = full[i]["role"] == "assistant"
        source = full[i]["_index"] if is_assistant else None
        segments.append(Segment(_render_body(i, full, thinking, drop, last_user), source))
        transition = _render_transition(i, full, thinking, drop, last_user)
        if transition:
            segments.append(Segment(transition, None))
    return segments


def encode_messages(
    messages: Sequence[Mapping],
    thinking_mode: str = "thinking",
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    add_default_bos_token: bool = True,
    context: Sequence[Mapping] | None = None,
    effort_profile: str = T.DEFAULT_EFFORT_PROFILE,
) -> str:
    """Render `messages` (OpenAI-style dicts) as DeepSeek-V4 prompt text.

    Args:
        messages: dicts with `role` in system, user, assistant, tool, developer, latest_reminder.
        thinking_mode: "thinking" (the current turn opens with `<think>`) or "chat".
        drop_thinking: drop reasoning of turns before the last user message (ignored when tools are present).
        reasoning_effort: under the "0424" profile None, "high" or "max" (only "max" adds text, in thinking mode);
            under "0731" "low" (also None), "high" or "max" ("high" and "max" add text).
        add_default_bos_token: start with BOS when there is no context.
        context: earlier messages that are already in the model's context; they shape the rendering of
            `messages` but are not rendered themselves.
        effort_profile: the release whose reasoning-effort block to render: "0424" (DeepSeek-V4-Flash / -Pro as
            first released, the default) or "0731" (DeepSeek-V4-Flash-0731); see `detect_effort_profile`.

    Raises:
        ChatFormatError: a `ValueError` naming the message index and the problem.
    """
    return "".join(
        s.text
        for s in render_segments(
            messages, thinking_mode, drop_thinking, reasoning_effort, add_default_bos_token, context, effort_profile
        )
    )
