"""SFT datasets -> `input_ids` / `attention_mask` / `labels` for DeepSeek-V4, through the chat-format package.

Row formats (one dataset uses one of them):

- conversational: `messages` (DeepSeek-V4 / OpenAI message dicts), optional `tools` (a list of tools or its JSON
  string). Assistant messages written in ReAct style (`Thought:` / `Action:` / `Action Input:` / `Observation:` /
  `Final Answer:` lines) are converted to native tool calls first (`react=None` converts a row when one of its
  assistant messages has such a line; True always; False never).
- conversational prompt-completion: `prompt` and `completion` are message lists; every assistant message of the
  completion is trained (tool calls included), nothing of the prompt.
- text prompt-completion: `prompt` and `completion` are strings; the tokens are BOS + prompt + completion + EOS with
  only completion + EOS trained.

Tool-call arguments may be JSON strings or dicts. `datasets` stores list/dict columns in Arrow, which fills every
key that another row has with null: tool schemas and dict arguments read from a dataset therefore have their null
values dropped here. Store them as JSON strings (as TRL recommends) to keep them exactly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..template import ConversationTokenizer
from ..template.react import has_react_keywords, react_to_messages
from ..template.tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def clean_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as read from a dataset row: null fields (Arrow's filler) dropped, dict arguments de-nulled."""
    return [_drop_nulls(message) for message in messages]


def parse_tools(tools: Any, row: int | None = None) -> list[dict] | None:
    """A `tools` cell: None, a list of tools, or its JSON string. Errors name `row` when it is given."""
    where = "" if row is None else f"row {row}: "
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}the `tools` column is not valid JSON ({exc})") from exc
    if not isinstance(tools, list):
        raise ValueError(f"{where}`tools` must be a list of tools or its JSON string, got {type(tools).__name__}")
    return _drop_nulls(tools)


def _is_react(messages: Sequence[Mapping], react: bool | None) -> bool:
    if react is not None:
        return react
    return any(
        m.get("role") == "assistant" and isinstance(m.get("content"), str) and has_react_keywords(m["content"])
        for m in messages
    )


def row_format(column_names: Sequence[str]) -> str:
    """'messages', 'prompt_completion' or raises, from a dataset's columns."""
    if "messages" in column_names:
        return "messages"
    if "prompt" in column_names and "completion" in column_names:
        return "prompt_completion"
    raise ValueError(
        f"the dataset has columns {list(column_names)}: hf_dsv4 trains on `messages` (+ optional `tools`) or "
        "`prompt` + `completion` rows"
    )


class SFTRowTokenizer:
    """Tokenizes batches of dataset rows (for `Dataset.map(batched=True)`) with a `ConversationTokenizer`.

    `assistant_only_loss=False` trains every token of conversational rows (labels = input_ids)."""

    def __init__(
        self,
        conversation_tokenizer: ConversationTokenizer,
        assistant_only_loss: bool = True,
        react: bool | None = None,
    ):
        self.conversations = conversation_tokenizer
        self.assistant_only_loss = assistant_only_loss
        self.react = react

    @property
    def tokenizer(self):
        return self.conversations.tokenizer

    def _convert(self, messages: Sequence[Mapping]) -> list[dict]:
        messages = clean_messages(messages)
        return react_to_messages(messages) if _is_react(messages, self.react) else messages

    def _messages(
        self, messages: Sequence[Mapping], tools: Any, completion: Sequence[Mapping] | None = None
    ) -> list[dict]:
        """Samples of a conversation, or of `messages` (the prompt) + `completion` with only the completion trained.
        ReAct text is converted in the prompt and in the completion separately. Errors get the row index in
        `__call__`."""
        if completion is None:
            samples = self.conversations(self._convert(messages), parse_tools(tools))
        else:
            samples = self.conversations.completion(
                self._convert(messages), self._convert(completion), parse_tools(tools)
            )
        if not self.assistant_only_loss:
            for sample in samples:
                sample["labels"] = list(sample["input_ids"])
        return samples

    def _text(self, prompt: str, completion: str) -> list[dict]:
        tok = self.tokenizer
        prompt_ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        completion_ids = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        limit = self.conversations.max_length
        if limit is not None and len(ids) > limit:
            if self.conversations.overlong == "drop":
                self.conversations.stats["dropped_overlong"] += 1  # the key `log_stats` reports
                return []
            if self.conversations.overlong == "raise":
                raise ValueError(f"a prompt-completion sample has {len(ids)} tokens, more than max_length={limit}")
            ids, labels = ids[:limit], labels[:limit]
            self.conversations.stats["truncated"] += 1
        return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}]

    def __call__(self, batch: Mapping[str, list], indices: list[int] | None = None) -> dict[str, list]:
        columns = list(batch)
        fmt = row_format(columns)
        n = len(batch[columns[0]])
        indices = indices if indices is not None else list(range(n))
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for i in range(n):
            try:
                if fmt == "messages":
                    tools = batch["tools"][i] if "tools" in batch else None
                    samples = self._messages(batch["messages"][i], tools)
                elif isinstance(batch["prompt"][i], str):
                    samples = self._text(batch["prompt"][i], batch["completion"][i])
                else:
                    tools = batch["tools"][i] if "tools" in batch else None
                    samples = self._messages(batch["prompt"][i], tools, completion=batch["completion"][i])
            except ValueError as exc:
                raise ValueError(f"dataset row {indices[i]}: {exc}") from exc
            for sample in samples:
                for key in out:
                    out[key].append(sample[key])
        return out


def tokenize_dataset(dataset, row_tokenizer: SFTRowTokenizer, num_proc: int | None = None, desc: str = "Tokenizing"):
    """`dataset` (a `datasets.Dataset`) mapped to `input_ids`, `attention_mask`, `labels`; other columns removed."""
    fmt = row_format(dataset.column_names)
    logger.info("tokenizing %d %s rows with the DeepSeek-V4 chat format", len(dataset), fmt)
    result = dataset.map(
        row_tokenizer,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=desc,
    )
    if row_tokenizer.conversations.stats["conversations"]:
        row_tokenizer.conversations.log_stats()
    elif num_proc is None and len(dataset):
        logger.info("tokenized samples reused from the datasets cache (%d samples)", len(result))
    return result
