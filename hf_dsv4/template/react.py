"""ReAct compatibility: read and write Thought/Action/Action Input/Observation/Final Answer text, and turn
ReAct-style agent conversations into native messages (assistant `tool_calls` + `tool` results) that the
DeepSeek-V4 encoder renders as DSML.

A keyword counts only at the start of a line (after optional spaces or tabs); a section runs from its keyword
to the next keyword line, and its text is stripped. Text before the first keyword counts as thought.

Decisions:

- An action input that is a JSON object is the arguments; any other JSON value `v` gives `{"input": v}`;
  text that is not JSON gives `{"input": text}` (a surrounding ```/```json fence is removed first); no input
  gives `{}`. Arguments are written as `json.dumps(dict, ensure_ascii=False)`.
- Call ids are `call_0`, `call_1`, ... : per text in `parse_react`, and across the whole conversation in
  `react_to_messages` (so every `tool_call_id` is unique there).
- `parse_react_step` reads one model step: it stops at the first Observation (what follows it was not
  produced by a tool).
- In `react_to_messages`, the thought before actions becomes the `content` of the assistant message that makes
  the calls; the thought before a Final Answer becomes the `reasoning_content` of the final message, whose
  `content` is the answer. `format_react` writes exactly these shapes back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from .encoder import ChatFormatError, tool_call_arguments

__all__ = [
    "AgentKeyword",
    "ToolDesc",
    "action_offset",
    "format_react",
    "has_react_keywords",
    "openai_tool_call",
    "parse_react",
    "parse_react_step",
    "react_to_messages",
]


@dataclass(frozen=True)
class AgentKeyword:
    """The keywords of a ReAct transcript; each starts a line.

    Args:
        action: starts the line naming the tool to call.
        action_input: starts the tool arguments.
        observation: starts the result of the last tool call.
        thought: starts the agent's reasoning before an action.
        final_answer: starts the answer that ends the agent's turn.

    Raises:
        ValueError: a blank keyword, or two the same.
    """

    action: str = field(default="Action:", metadata={"help": "Starts the line naming the tool to call."})
    action_input: str = field(
        default="Action Input:", metadata={"help": "Starts the tool arguments (a JSON object, or free text)."}
    )
    observation: str = field(default="Observation:", metadata={"help": "Starts the result of the last tool call."})
    thought: str = field(default="Thought:", metadata={"help": "Starts the agent's reasoning before an action."})
    final_answer: str = field(
        default="Final Answer:", metadata={"help": "Starts the answer that ends the agent's turn."}
    )

    def __post_init__(self):
        words = [getattr(self, f.name) for f in fields(self)]
        if not all(isinstance(w, str) and w.strip() for w in words) or len(set(words)) != len(words):
            raise ValueError(f"AgentKeyword needs distinct, non-blank keywords, got {words}")


@dataclass
class ToolDesc:
    """A tool as a ReAct prompt describes it; converts to and from the OpenAI tool format.

    Args:
        name, description, parameters: the fields (see each one's `help`).
    """

    name: str = field(metadata={"help": "The name the agent writes after the action keyword."})
    description: str = field(default="", metadata={"help": "What the tool does, for the model."})
    parameters: dict = field(default_factory=dict, metadata={"help": "JSON schema of the arguments."})

    @classmethod
    def from_openai(cls, tool: Mapping) -> ToolDesc:
        """From `{"type": "function", "function": {"name", "description", "parameters"}}` or the bare function."""
        function = tool.get("function", tool)
        return cls(function["name"], function.get("description") or "", dict(function.get("parameters") or {}))

    def to_openai(self) -> dict:
        """The OpenAI tool dict."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}

    def render(self, template: str = "{name}: {description} Parameters: {parameters}") -> str:
        """One description line; `template` may use {name}, {description} and {parameters} (compact JSON)."""
        parameters = json.dumps(self.parameters, ensure_ascii=False)
        return template.format(name=self.name, description=self.description, parameters=parameters)

    def __str__(self) -> str:
        return self.render()


class _Section(NamedTuple):
    kind: str | None  # an AgentKeyword field name; None for the text before the first keyword
    body: str
    start: int  # offset of the line that opens the section


def _sections(text: str, keywords: AgentKeyword) -> list[_Section]:
    """Split `text` at keyword lines; the first section is the (maybe empty) text before any keyword."""
    words = sorted(((getattr(keywords, f.name), f.name) for f in fields(keywords)), key=lambda w: -len(w[0]))
    sections, kind, start, body_at, offset = [], None, 0, 0, 0
    for line in text.split("\n"):
        stripped = line.lstrip(" \t")
        for word, name in words:
            if stripped.startswith(word):
                sections.append(_Section(kind, text[body_at:offset].strip(), start))
                kind, start, body_at = name, offset, offset + len(line) - len(stripped) + len(word)
                break
        offset += len(line) + 1
    sections.append(_Section(kind, text[body_at:].strip(), start))
    return sections


def openai_tool_call(index: int, name: str, arguments: Mapping) -> dict:
    """An OpenAI tool call.

    Args:
        index: the call's position (its id is `call_{index}`).
        name: the function name.
        arguments: the arguments, written as a JSON-object string.

    Returns:
        `{"id", "type": "function", "function": {"name", "arguments"}}`.
    """
    arguments_json = json.dumps(dict(arguments), ensure_ascii=False)
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": arguments_json}}


def _action_arguments(text: str) -> dict:
    if not text:
        return {}
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        first_line_end = text.find("\n")
        text = text[first_line_end + 1 : -3].strip() if 0 <= first_line_end < len(text) - 3 else text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"input": text}
    return value if isinstance(value, dict) else {"input": value}


def parse_react_step(text: str, keywords: AgentKeyword = AgentKeyword()) -> dict:
    """One ReAct step: `{"thought": str, "tool_calls": [...], "final_answer": str | None}`.

    The thought is the text before the first action or final answer (keyword removed, parts joined by newlines).
    Reading stops at the first Observation. Never raises.

    Args:
        text: one assistant text in ReAct form.
        keywords: the transcript's keywords.

    Returns:
        The step; an Action Input that is not a JSON object becomes `{"input": ...}`.
    """
    thought: list[str] = []
    calls: list[dict] = []
    final_answer = None
    awaiting_input = False
    for kind, body, _ in _sections(text, keywords):
        if kind == "observation":
            break
        if kind in (None, "thought") and not calls and final_answer is None and body:
            thought.append(body)
        elif kind == "action":
            calls.append(openai_tool_call(len(calls), body, {}))
            awaiting_input = True
        elif kind == "action_input" and awaiting_input:
            calls[-1] = openai_tool_call(len(calls) - 1, calls[-1]["function"]["name"], _action_arguments(body))
            awaiting_input = False
        elif kind == "final_answer" and final_answer is None:
            final_answer = body
    return {"thought": "\n".join(thought), "tool_calls": calls, "final_answer": final_answer}


def parse_react(text: str, keywords: AgentKeyword = AgentKeyword()) -> list[dict]:
    """The tool calls of one ReAct step (`parse_react_step(text, keywords)["tool_calls"]`). Never raises.

    Args:
        text: one assistant text in ReAct form.
        keywords: the transcript's keywords.

    Returns:
        OpenAI-format tool calls; [] when the step has no action.
    """
    return parse_react_step(text, keywords)["tool_calls"]


def action_offset(text: str, keywords: AgentKeyword = AgentKeyword()) -> int | None:
    """Where the first action of the step starts.

    Args:
        text: one assistant text in ReAct form.
        keywords: the transcript's keywords.

    Returns:
        The offset in `text` of the line holding the first Action, or None when there is none before an Observation.
    """
    for kind, _, start in _sections(text, keywords):
        if kind == "observation":
            return None
        if kind == "action":
            return start
    return None


def format_react(message: Mapping, keywords: AgentKeyword = AgentKeyword()) -> str:
    """ReAct text of a native message: an assistant message with `tool_calls` gives its content as the thought
    and one Action/Action Input pair per call; one without gives its reasoning as the thought and its content as
    the Final Answer; a `tool` message gives the Observation. The inverse of `react_to_messages` per message.

    Args:
        message: an assistant or tool message.
        keywords: the transcript's keywords.

    Returns:
        The ReAct lines, joined by newlines.

    Raises:
        ValueError: another role, or a tool message whose content is not a string.
        ChatFormatError: tool call arguments that are not a JSON object.
    """
    role = message.get("role")
    content = message.get("content") or ""
    if role == "tool":
        if not isinstance(content, str):
            raise ValueError("format_react needs a tool message with string content")
        return f"{keywords.observation} {content}"
    if role != "assistant":
        raise ValueError(f"format_react formats assistant and tool messages, not {role!r}")
    lines = []
    if message.get("tool_calls"):
        if content:
            lines.append(f"{keywords.thought} {content}")
        for call in message["tool_calls"]:
            arguments = json.dumps(tool_call_arguments(call["function"].get("arguments", "{}")), ensure_ascii=False)
            lines += [f"{keywords.action} {call['function']['name']}", f"{keywords.action_input} {arguments}"]
    else:
        if message.get("reasoning_content"):
            lines.append(f"{keywords.thought} {message['reasoning_content']}")
        lines.append(f"{keywords.final_answer} {content}")
    return "\n".join(lines)


class _Converter:
    """The state of `react_to_messages`: messages written so far and the calls still awaiting an Observation."""

    def __init__(self, keywords: AgentKeyword):
        self.keywords = keywords
        self.out: list[dict] = []
        self.pending: list[str] = []  # ids of calls without an observation yet, in call order
        self.calls = 0  # calls made so far: the next call id is call_{calls}

    def add(self, i: int, message: Mapping) -> None:
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if role else None
        text = content if isinstance(content, str) else ""
        if role == "assistant" and not message.get("tool_calls") and _has_keyword(text, self.keywords):
            if self.pending:
                raise ChatFormatError(f"tool calls {self.pending} got no {self.keywords.observation!r}", i)
            self.assistant(i, message, text)
        elif role == "user" and self.pending:
            self.observations(i, text)
        elif self.pending:
            raise ChatFormatError(
                f"expected a user message with {self.keywords.observation!r} for tool calls {self.pending}", i
            )
        else:
            self.out.append(dict(message) if isinstance(message, Mapping) else message)

    def assistant(self, i: int, message: Mapping, text: str) -> None:
        first = len(self.out)
        thought: list[str] = []
        step: dict | None = None  # the assistant message collecting this step's calls
        awaiting_input = False
        for kind, body, _ in _sections(text, self.keywords):
            if kind in (None, "thought"):
                if self.pending:
                    raise ChatFormatError(f"{self.keywords.thought!r} after an action without an observation", i)
                thought += [body] if body else []
            elif kind == "action":
                if step is not None and self.out[-1] is not step:
                    raise ChatFormatError(f"an action while tool calls {self.pending} have no observation", i)
                if step is None:
                    step = {"role": "assistant", "content": "\n".join(thought), "tool_calls": []}
                    self.out.append(step)
                    thought = []
                step["tool_calls"].append(openai_tool_call(self.calls, body, {}))
                self.pending.append(f"call_{self.calls}")
                self.calls += 1
                awaiting_input = True
            elif kind == "action_input":
                if not awaiting_input:
                    raise ChatFormatError(f"{self.keywords.action_input!r} without a preceding action", i)
                name = step["tool_calls"][-1]["function"]["name"]
                step["tool_calls"][-1] = openai_tool_call(self.calls - 1, name, _action_arguments(body))
                awaiting_input = False
            elif kind == "observation":
                self.observe(i, body)
                awaiting_input = False
                step = None if not self.pending else step
            else:  # final answer
                if self.pending:
                    raise ChatFormatError(f"final answer while tool calls {self.pending} have no observation", i)
                final = {"role": "assistant", "content": body}
                if thought:
                    final["reasoning_content"] = "\n".join(thought)
                self.out.append(final)
                thought = []
        if thought:
            self.out.append({"role": "assistant", "content": "\n".join(thought)})
        if message.get("reasoning_content"):
            self.carry_reasoning(first, message["reasoning_content"])

    def carry_reasoning(self, first: int, reasoning: str) -> None:
        """Put the input message's own reasoning on the first assistant message made from it."""
        target = next((m for m in self.out[first:] if m["role"] == "assistant"), None)
        if target is None:
            return
        joined = [reasoning, target["reasoning_content"]] if target.get("reasoning_content") else [reasoning]
        target["reasoning_content"] = "\n".join(joined)

    def observe(self, i: int, body: str) -> None:
        if not self.pending:
            raise ChatFormatError(f"{self.keywords.observation!r} without a pending action", i)
        self.out.append({"role": "tool", "tool_call_id": self.pending.pop(0), "content": body})

    def observations(self, i: int, text: str) -> None:
        sections = _sections(text, self.keywords)
        if sections[0].body or any(s.kind != "observation" for s in sections[1:]) or len(sections) == 1:
            raise ChatFormatError(
                f"expected only {self.keywords.observation!r} sections answering tool calls {self.pending}", i
            )
        if len(sections) - 1 != len(self.pending):
            raise ChatFormatError(f"{len(sections) - 1} observations for {len(self.pending)} pending tool calls", i)
        for section in sections[1:]:
            self.observe(i, section.body)


def _has_keyword(text: str, keywords: AgentKeyword) -> bool:
    return any(s.kind is not None for s in _sections(text, keywords))


def has_react_keywords(text: str, keywords: AgentKeyword = AgentKeyword()) -> bool:
    """Whether `text` has a ReAct keyword line (Thought, Action, Action Input, Observation, Final Answer).

    Args:
        text: the text to look in.
        keywords: the transcript's keywords.

    Returns:
        True when a line starts with one of `keywords`.
    """
    return _has_keyword(text, keywords)


def react_to_messages(messages: Sequence[Mapping], keywords: AgentKeyword = AgentKeyword()) -> list[dict]:
    """Turn a ReAct agent conversation into native messages the encoder renders as DSML.

    Assistant texts with keywords become assistant messages (`content` = the thought, `tool_calls` with ids
    `call_{k}`), `tool` messages (`tool_call_id`, the observation) and a final assistant message (`content` = the
    final answer, `reasoning_content` = the thought before it). Observations may follow the action in the same
    assistant text or fill the next user message (one Observation section per pending call). Other messages are
    copied.

    Args:
        messages: the conversation, ReAct text in its assistant (and Observation-bearing user) messages.
        keywords: the transcript's keywords.

    Returns:
        The native messages, in order.

    Raises:
        ChatFormatError: naming the message index (an observation without an action, an action never observed,
            an action input without an action, ...).
    """
    converter = _Converter(keywords)
    for i, message in enumerate(messages):
        converter.add(i, message)
    return converter.out
