"""Shared pytest fixtures: the official DeepSeek-V4 encoding fixtures and the tiny tokenizer."""

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


@pytest.fixture(scope="session")
def tokenizer():
    from hf_dsv4.testing import tiny_tokenizer

    return tiny_tokenizer()
