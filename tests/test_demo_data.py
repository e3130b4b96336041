"""The shipped demo SFT dataset (recipes/data/dsv4_demo.jsonl): loads with `datasets`, renders, tokenizes with
trained labels, covers every kind of conversation, and is exactly what its generator writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_dsv4.template import encode_messages, react_to_messages, tokenize_conversation
from hf_dsv4.template.encoder import attach_tools

DATA_DIR = Path(__file__).resolve().parents[1] / "recipes" / "data"
DEMO = DATA_DIR / "dsv4_demo.jsonl"
GENERATOR = DATA_DIR / "make_demo_data.py"
MAX_TOKENS = 400  # per conversation with the tiny tokenizer, not counting the fixed tools block


@pytest.fixture(scope="module")
def rows() -> list[tuple[list[dict], list[dict] | None]]:
    """(messages without None-valued keys, tools parsed from their JSON string) of every row, as `datasets`
    loads them."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(DEMO), split="train")
    assert dataset.column_names == ["messages", "tools"]
    return [
        (
            [{key: value for key, value in message.items() if value is not None} for message in row["messages"]],
            json.loads(row["tools"]) if row["tools"] is not None else None,
        )
        for row in dataset
    ]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_generator_reproduces_the_committed_file_byte_for_byte(tmp_path):
    output = tmp_path / "demo.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), "--output", str(output)], check=True, capture_output=True)
    assert output.read_bytes() == DEMO.read_bytes()


def test_every_row_loads_renders_and_has_trained_labels(rows, tokenizer):
    assert len(rows) == len(DEMO.read_text(encoding="utf-8").splitlines()) == 48
    for i, (messages, tools) in enumerate(rows):
        native = react_to_messages(messages)
        text = encode_messages(attach_tools(native, tools), thinking_mode="thinking")
        assert text.startswith("<｜begin▁of▁sentence｜>") and text.endswith("<｜end▁of▁sentence｜>"), i
        sample = tokenize_conversation(tokenizer, native, tools)
        assert sample is not None and sum(label != -100 for label in sample["labels"]) > 0, i
        assert tokenizer.decode(sample["input_ids"]) == text, i
        tools_block = encode_messages(attach_tools([], tools), thinking_mode="thinking") if tools else ""
        own_tokens = len(sample["input_ids"]) - len(tokenizer.encode(tools_block, add_special_tokens=False))
        assert own_tokens < MAX_TOKENS, (i, own_tokens)


def test_rows_cover_reasoning_multi_turn_tool_calls_and_react(rows):
    counts = dict.fromkeys(["tool_calls", "reasoning_content", "multi_turn", "react"], 0)
    for messages, tools in rows:
        native = react_to_messages(messages)
        counts["tool_calls"] += any(m.get("tool_calls") for m in messages)
        counts["reasoning_content"] += any(m.get("reasoning_content") for m in messages)
        counts["multi_turn"] += sum(m["role"] == "user" for m in native) >= 2
        counts["react"] += native != messages
        # tools travel as a JSON string exactly when the row makes native tool calls
        assert (tools is not None) == any(m.get("tool_calls") for m in messages)
    assert counts["tool_calls"] >= 10
    assert counts["reasoning_content"] >= 10
    assert counts["multi_turn"] >= 8
    assert counts["react"] >= 4


def test_react_rows_become_native_tool_calls_answered_by_tool_messages(rows):
    react = [(messages, react_to_messages(messages)) for messages, _ in rows]
    react = [(messages, native) for messages, native in react if native != messages]
    for messages, native in react:
        calls = [call["id"] for m in native if m["role"] == "assistant" for call in m.get("tool_calls", [])]
        assert calls and [m["tool_call_id"] for m in native if m["role"] == "tool"] == calls
        assert native[-1]["role"] == "assistant" and native[-1]["reasoning_content"] and native[-1]["content"]
        assert messages[-1]["content"].endswith(native[-1]["content"])


LONG = DATA_DIR / "dsv4_demo_long.jsonl"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_generator_reproduces_the_long_file_byte_for_byte(tmp_path):
    output = tmp_path / "long.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), "--long", "--output", str(output)], check=True, capture_output=True)
    assert output.read_bytes() == LONG.read_bytes()


def test_long_rows_are_8k_token_agent_traces_that_fit_the_long_config(tokenizer):
    """recipes/configs/tiny_cpu_long.yaml trains them at max_length 8192: each fits whole, 21 tool rounds."""
    import yaml

    config = yaml.safe_load((DATA_DIR.parent / "configs" / "tiny_cpu_long.yaml").read_text())
    rows = [json.loads(line) for line in LONG.read_text().splitlines()]
    assert len(rows) == 8 and config["dataset_name"] == "recipes/data/dsv4_demo_long.jsonl"
    for row in rows:
        sample = tokenize_conversation(tokenizer, row["messages"], json.loads(row["tools"]))
        assert 7900 <= len(sample["input_ids"]) <= config["max_length"] == 8192
        assert sum(label != -100 for label in sample["labels"]) > 5000
        assert sum(1 for m in row["messages"] if m["role"] == "tool") == 42
