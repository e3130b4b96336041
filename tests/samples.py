"""Data shared by several test modules: DeepSeek's official encoding fixtures, a tool, a multi-turn conversation.

Fixtures (pytest's) live in conftest.py; this module holds plain values and loaders that test modules import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIXTURE_DIR = Path(
    os.environ.get("HF_DSV4_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "dsv4_encoding_fixtures")
)

# case -> thinking mode, as documented in the fixtures' README
FIXTURE_MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}


def load_fixture(case: int) -> tuple[list[dict], str, str]:
    """(messages, thinking_mode, expected text) of official fixture `case`."""
    if not FIXTURE_DIR.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"official fixtures not found at {FIXTURE_DIR} (set HF_DSV4_FIXTURES)")
        pytest.skip(f"official fixtures not found at {FIXTURE_DIR} (set HF_DSV4_FIXTURES)")
    data = json.loads((FIXTURE_DIR / f"test_input_{case}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    expected = (FIXTURE_DIR / f"test_output_{case}.txt").read_text(encoding="utf-8")
    return messages, FIXTURE_MODES[case], expected


# a tool in OpenAI format (the ReAct, data and parser tests use it)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}

# a two-turn thinking conversation: not prefix-stable (the first answer loses its reasoning once a later turn exists)
MULTI_TURN = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "reasoning_content": "greet", "content": "Hi!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "reasoning_content": "easy", "content": "Paris."},
]
