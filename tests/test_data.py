"""SFT dataset rows -> input_ids / attention_mask / labels: every row format, Arrow round trips, ReAct, errors."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
from samples import MULTI_TURN, WEATHER

from hf_dsv4.template import ConversationTokenizer, install_chat_template, react_to_messages, tokenize_conversation
from hf_dsv4.testing import tiny_tokenizer
from hf_dsv4.training.data import SFTRowTokenizer, clean_messages, parse_tools, row_format, tokenize_dataset

SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
    },
}


def tool_call(arguments) -> dict:
    return {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Use the tool.",
        "content": "",
        "tool_calls": [tool_call({"location": "Paris"})],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    {"role": "assistant", "reasoning_content": "Report it.", "content": "Sunny."},
]
TWO_TURNS = MULTI_TURN  # system, user, assistant, user, assistant
REACT = [
    {"role": "user", "content": "What is the capital of France?"},
    {
        "role": "assistant",
        "content": 'Thought: I need to look this up.\nAction: search\nAction Input: {"query": "capital of France"}',
    },
    {"role": "user", "content": "Observation: Paris"},
    {"role": "assistant", "content": "Thought: I know it now.\nFinal Answer: The capital of France is Paris."},
]


@pytest.fixture(scope="module")
def tok():
    return install_chat_template(tiny_tokenizer())


def rows_tokenizer(tok, assistant_only_loss: bool = True, react: bool | None = None, **conversation) -> SFTRowTokenizer:
    return SFTRowTokenizer(
        ConversationTokenizer(tok, **conversation), assistant_only_loss=assistant_only_loss, react=react
    )


def one(row_tokenizer: SFTRowTokenizer, row: dict, index: int = 0) -> list[dict]:
    """The samples of one Python row, as dicts."""
    out = row_tokenizer({key: [value] for key, value in row.items()}, [index])
    return [dict(zip(out, values)) for values in zip(*out.values())]


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of trained (non -100) labels."""
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ------------------------------------------------------------------------------------------- cells and columns
def test_clean_messages_drops_null_fields_recursively_and_keeps_the_input():
    messages = [
        {"role": "user", "content": "hi", "tool_calls": None, "reasoning_content": None},
        {"role": "assistant", "content": None, "tool_calls": [tool_call({"location": "Paris", "unit": None})]},
    ]
    before = copy.deepcopy(messages)
    assert clean_messages(messages) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [tool_call({"location": "Paris"})]},
    ]
    assert messages == before
    assert clean_messages([{"role": "user", "content": [None, "a"]}]) == [{"role": "user", "content": [None, "a"]}]


def test_parse_tools_accepts_none_a_list_or_its_json_and_drops_arrow_nulls():
    assert parse_tools(None) is None and parse_tools("") is None
    assert parse_tools([WEATHER]) == [WEATHER]
    assert parse_tools(json.dumps([WEATHER, SEARCH])) == [WEATHER, SEARCH]
    with_nulls = {"type": "function", "function": {**SEARCH["function"], "description": None}}
    assert parse_tools([with_nulls]) == [SEARCH]


def test_parse_tools_errors_name_the_row_when_given():
    with pytest.raises(ValueError, match=r"^row 4: the `tools` column is not valid JSON \(Expecting value"):
        parse_tools("[", row=4)
    with pytest.raises(ValueError, match=r"^the `tools` column is not valid JSON \("):
        parse_tools("nope")
    with pytest.raises(ValueError, match=r"^row 1: `tools` must be a list of tools or its JSON string, got dict$"):
        parse_tools(json.dumps(WEATHER), row=1)


def test_row_format_from_columns():
    assert row_format(["messages", "tools", "id"]) == "messages"
    assert row_format(["prompt", "completion"]) == "prompt_completion"
    assert row_format(["messages", "prompt", "completion"]) == "messages"
    for columns in (["text"], ["prompt"], ["completion", "tools"]):
        with pytest.raises(ValueError) as excinfo:
            row_format(columns)
        assert str(excinfo.value) == (
            f"the dataset has columns {columns}: hf_dsv4 trains on `messages` (+ optional `tools`) or "
            "`prompt` + `completion` rows"
        )


def test_tokenize_dataset_refuses_a_dataset_without_messages_or_prompt_completion(tok):
    dataset = datasets.Dataset.from_list([{"text": "hello", "prompt": "a"}])
    with pytest.raises(ValueError, match=r"^the dataset has columns \['text', 'prompt'\]: hf_dsv4 trains on"):
        tokenize_dataset(dataset, rows_tokenizer(tok))


# ----------------------------------------------------------------------------------------- conversational rows
def test_messages_row_is_tokenize_conversation(tok):
    [sample] = one(rows_tokenizer(tok), {"messages": TOOL_CONVERSATION, "tools": [WEATHER]})
    assert sample == tokenize_conversation(tok, TOOL_CONVERSATION, [WEATHER])
    assert '{"name": "get_weather", "description": "Current weather of a city."' in tok.decode(sample["input_ids"])
    assert len(trained_runs(sample["labels"])) == 2


def test_tools_as_a_list_or_its_json_string_give_the_same_sample(tok):
    rows = rows_tokenizer(tok)
    as_list = one(rows, {"messages": TOOL_CONVERSATION, "tools": [WEATHER, SEARCH]})
    as_json = one(rows, {"messages": TOOL_CONVERSATION, "tools": json.dumps([WEATHER, SEARCH])})
    without = one(rows, {"messages": TOOL_CONVERSATION, "tools": None})
    assert as_list == as_json
    assert as_list != without  # the tools are rendered


def test_tool_call_arguments_as_dict_or_json_string_give_the_same_sample(tok):
    as_json = copy.deepcopy(TOOL_CONVERSATION)
    as_json[1]["tool_calls"] = [tool_call('{"location": "Paris"}')]
    rows = rows_tokenizer(tok)
    assert one(rows, {"messages": TOOL_CONVERSATION}) == one(rows, {"messages": as_json})


def test_arrow_round_trip_gives_the_samples_of_the_python_rows(tok):
    rows = [
        {"messages": TOOL_CONVERSATION, "tools": [WEATHER]},
        {"messages": TWO_TURNS, "tools": [SEARCH]},  # Arrow adds `location: null` and `description: null` here
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "tools": None},
    ]
    dataset = datasets.Dataset.from_list(rows)
    assert dataset[1]["messages"][0]["tool_calls"] is None  # what Arrow does to missing keys
    assert dataset[1]["tools"][0]["function"]["parameters"]["properties"]["location"] is None
    row_tokenizer = rows_tokenizer(tok)
    tokenized = tokenize_dataset(dataset, row_tokenizer)
    expected = [sample for row in rows for sample in one(row_tokenizer, row)]
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert tokenized.to_list() == expected


def test_assistant_only_loss_false_trains_every_token(tok):
    [sample] = one(rows_tokenizer(tok, assistant_only_loss=False), {"messages": TWO_TURNS})
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"] == tokenize_conversation(tok, TWO_TURNS)["input_ids"]


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    prompt, completion = TWO_TURNS[:4], TWO_TURNS[4:]
    [sample] = one(rows_tokenizer(tok), {"prompt": prompt, "completion": completion, "tools": json.dumps([SEARCH])})
    assert sample == tokenize_conversation(tok, TWO_TURNS, [SEARCH], turns="last")

    every_turn = tokenize_conversation(tok, TWO_TURNS, [SEARCH])  # the prompt's assistant turn trained too
    assert sample["input_ids"] == every_turn["input_ids"]
    runs = trained_runs(every_turn["labels"])
    assert len(runs) == 2
    start, end = runs[-1]
    assert sample["labels"] == [-100] * start + every_turn["labels"][start:end] + [-100] * (len(sample["labels"]) - end)
    assert tok.decode(sample["input_ids"][start:end]) == f"easy</think>Paris.{tok.eos_token}"


def test_a_completion_with_a_tool_round_trains_every_completion_assistant_message(tok):
    call = {"id": "call_0", "type": "function", "function": {"name": "search", "arguments": '{"q": "Paris"}'}}
    prompt = [{"role": "user", "content": "Where is the Louvre?"}]
    completion = [
        {"role": "assistant", "reasoning_content": "look it up", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": "Paris"},
        {"role": "assistant", "content": "In Paris."},
    ]
    [sample] = one(rows_tokenizer(tok), {"prompt": prompt, "completion": completion, "tools": json.dumps([SEARCH])})
    # exactly what training the whole conversation gives: the prompt has no assistant message
    assert sample == tokenize_conversation(tok, prompt + completion, [SEARCH])
    runs = trained_runs(sample["labels"])
    assert len(runs) == 2  # the tool-call turn and the answer, not only the trailing message
    assert tok.decode(sample["input_ids"][slice(*runs[-1])]) == f"</think>In Paris.{tok.eos_token}"


def test_prompt_completion_restores_the_turn_policy(tok):
    row_tokenizer = rows_tokenizer(tok, turns="per_turn")
    one(row_tokenizer, {"prompt": TWO_TURNS[:4], "completion": TWO_TURNS[4:]})
    assert row_tokenizer.conversations.turns == "per_turn"
    assert len(one(row_tokenizer, {"messages": TWO_TURNS})) == 2


# ------------------------------------------------------------------------------------- text prompt-completion
def text_ids(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    head = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
    tail = [*tok.encode(completion, add_special_tokens=False), tok.eos_token_id]
    return head, tail


def test_text_prompt_completion_is_bos_prompt_completion_eos_with_the_prompt_masked(tok):
    head, tail = text_ids(tok, "What is 2+2?", " It is 4.")
    assert (head[0], tail[-1]) == (0, 1) and len(tail) > 2
    [sample] = one(rows_tokenizer(tok), {"prompt": "What is 2+2?", "completion": " It is 4."})
    assert sample == {
        "input_ids": head + tail,
        "attention_mask": [1] * len(head + tail),
        "labels": [-100] * len(head) + tail,
    }


def test_text_prompt_completion_over_max_length_follows_overlong(tok):
    row = {"prompt": "What is 2+2?", "completion": " It is 4."}
    head, tail = text_ids(tok, row["prompt"], row["completion"])
    limit = len(head) + 2

    truncating = rows_tokenizer(tok, max_length=limit)
    [sample] = one(truncating, row)
    assert sample == {
        "input_ids": (head + tail)[:limit],
        "attention_mask": [1] * limit,
        "labels": [-100] * len(head) + tail[:2],
    }
    assert truncating.conversations.stats["truncated"] == 1

    dropping = rows_tokenizer(tok, max_length=limit, overlong="drop")
    assert one(dropping, row) == []
    assert dropping.conversations.stats["dropped_overlong"] == 1  # the count log_stats reports

    with pytest.raises(ValueError) as excinfo:
        one(rows_tokenizer(tok, max_length=limit, overlong="raise"), row, index=6)
    assert str(excinfo.value) == (
        f"dataset row 6: a prompt-completion sample has {len(head + tail)} tokens, more than max_length={limit}"
    )
    assert one(rows_tokenizer(tok, max_length=len(head + tail), overlong="raise"), row)[0]["input_ids"] == head + tail


# ------------------------------------------------------------------------------------------------------- ReAct
def test_react_rows_are_converted_when_react_is_none(tok):
    converted = react_to_messages(REACT)
    assert [m["role"] for m in converted] == ["user", "assistant", "tool", "assistant"]
    expected = ConversationTokenizer(tok)(converted, [SEARCH])
    assert one(rows_tokenizer(tok), {"messages": REACT, "tools": [SEARCH]}) == expected
    assert one(rows_tokenizer(tok, react=True), {"messages": REACT, "tools": [SEARCH]}) == expected
    text = tok.decode(expected[0]["input_ids"])
    assert '<｜DSML｜invoke name="search">' in text and "<tool_result>Paris</tool_result>" in text


def test_react_rows_are_kept_as_text_when_react_is_false(tok):
    [sample] = one(rows_tokenizer(tok, react=False), {"messages": REACT, "tools": [SEARCH]})
    assert [sample] == ConversationTokenizer(tok)(REACT, [SEARCH])
    assert "Action Input:" in tok.decode(sample["input_ids"])
    assert '<｜DSML｜invoke name="search">' not in tok.decode(sample["input_ids"])


def test_rows_without_react_keywords_are_not_converted(tok):
    assert one(rows_tokenizer(tok), {"messages": TWO_TURNS}) == ConversationTokenizer(tok)(TWO_TURNS)


# ------------------------------------------------------------------------------------------------------ errors
def test_invalid_tools_json_raises_naming_the_dataset_row(tok):
    rows = [{"messages": TWO_TURNS, "tools": None}] * 2 + [{"messages": TWO_TURNS, "tools": "[{not json"}]
    with pytest.raises(ValueError, match=r"^dataset row 2: the `tools` column is not valid JSON \(Expecting"):
        tokenize_dataset(datasets.Dataset.from_list(rows), rows_tokenizer(tok))


def test_unknown_role_raises_naming_the_dataset_row_and_the_message(tok):
    bad = [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]
    batch = {"messages": [TWO_TURNS, bad]}
    with pytest.raises(ValueError, match=r"^dataset row 8: message 1: .*'robot'"):
        rows_tokenizer(tok)(batch, [7, 8])


# ------------------------------------------------------------------------------------------- tokenize_dataset
def test_tokenize_dataset_removes_other_columns_and_keeps_row_order(tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rows = [
        {"id": 0, "source": "a", "messages": TWO_TURNS},
        {"id": 1, "source": "b", "messages": short},
        {"id": 2, "source": "c", "messages": TOOL_CONVERSATION},
    ]
    tokenized = tokenize_dataset(datasets.Dataset.from_list(rows), rows_tokenizer(tok))
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert tokenized.to_list() == [tokenize_conversation(tok, row["messages"]) for row in rows]


def test_tokenize_dataset_per_turn_gives_one_sample_per_assistant_turn_in_order(tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    dataset = datasets.Dataset.from_list([{"messages": TWO_TURNS}, {"messages": short}])
    tokenized = tokenize_dataset(dataset, rows_tokenizer(tok, turns="per_turn"))
    per_turn = ConversationTokenizer(tok, turns="per_turn")
    expected = per_turn(TWO_TURNS) + per_turn(short)
    assert len(expected) == 3
    assert tokenized.to_list() == expected
    assert expected[0]["input_ids"] != expected[1]["input_ids"][: len(expected[0]["input_ids"])]  # not prefix-stable
