"""Tokenize DeepSeek-V4 conversations with assistant-only labels, without going through Jinja.

A conversation is rendered once by the Python encoder into segments (prompt text / each assistant message's
trainable span), the whole text is tokenized once, and labels are copied from `input_ids` for exactly the tokens
that overlap a trainable span. The overlap rule is the one transformers uses for `return_assistant_tokens_mask`,
so the labels equal the Jinja template's assistant mask on the same text (tested), at a fraction of the cost.

Trainable span: from right after the `<think>`/`</think>` that follows `<｜Assistant｜>` to EOS inclusive —
reasoning, `</think>`, content and the DSML tool-call block. Prompt-side tokens are never trained.

Multi-turn thinking is not prefix-stable: with `thinking_mode="thinking"`, `drop_thinking=True` and no tools, a
turn renders with its reasoning only while it is the latest one; once a later user turn exists it renders as
`</think>content`. `turns` chooses what to train:

- "all" (default): every assistant message, as rendered in the full conversation. One sample per conversation;
  identical to TRL's `assistant_only_loss` with our chat template. Earlier turns are trained without their
  reasoning (as the model sees them in context); their reasoning is never trained.
- "last": only the trailing assistant messages (after the last non-assistant message).
- "per_turn": one sample per assistant turn, each the conversation up to that turn with "last" labels, so every
  turn is trained exactly as it is generated at inference, reasoning included. Costs O(turns^2) tokens.

When the rendering is prefix-stable (chat mode, tools present, or `drop_thinking=False`), "all" already trains
every turn as generated.
"""

from __future__ import annotations

import bisect
import json
import logging
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .encoder import attach_tools, check_options, render_segments
from .tokens import DEFAULT_EFFORT_PROFILE

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TURNS = ("all", "last", "per_turn")
OVERLONG = ("truncate", "drop", "raise")


def validate_policies(turns: str, overlong: str) -> None:
    """Raise ValueError unless `turns` is one of TURNS and `overlong` one of OVERLONG."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")


class OverlongSampleError(ValueError):
    """A sample is longer than `max_length` under `overlong="raise"`."""


def _trailing_assistants(messages: Sequence[Mapping]) -> int:
    """Index of the first message of the trailing run of assistant messages (len(messages) if there is none)."""
    start = len(messages)
    while start > 0 and messages[start - 1].get("role") == "assistant":
        start -= 1
    return start


def turn_prefixes(messages: Sequence[Mapping]) -> list[list[Mapping]]:
    """The conversation cut after each assistant turn (a run of assistant messages followed by another role)."""
    return [
        list(messages[: i + 1])
        for i, msg in enumerate(messages)
        if msg.get("role") == "assistant" and (i + 1 == len(messages) or messages[i + 1].get("role") != "assistant")
    ]


def char_spans_to_token_mask_ranges(
    offsets: Sequence[tuple[int, int]], spans: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token index ranges [a, b) of the tokens overlapping each char span [s, e) (token_end > s and token_start < e)."""
    ends = [end for _, end in offsets]
    starts = [start for start, _ in offsets]
    ranges = []
    for s, e in spans:
        a = bisect.bisect_right(ends, s)
        b = bisect.bisect_left(starts, e)
        if b > a:
            ranges.append((a, b))
    return ranges


def _encoding_ranges(encoding: Any, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """`char_spans_to_token_mask_ranges` computed from a `tokenizers.Encoding` at the span edges only (a few calls
    into Rust instead of materialising every offset); None when a span edge is not covered by a token."""
    n = len(encoding)
    ranges = []
    for s, e in spans:
        if e <= s:
            continue
        a, b = encoding.char_to_token(s), encoding.char_to_token(e - 1)
        if a is None or b is None:
            return None
        while a > 0 and encoding.token_to_chars(a - 1)[1] > s:  # tokens sharing the edge character
            a -= 1
        while b + 1 < n and encoding.token_to_chars(b + 1)[0] < e:
            b += 1
        ranges.append((a, b + 1))
    return ranges


def is_identity_normalizer(normalizer: Any) -> bool:
    """Whether a `tokenizers` normalizer provably leaves every text unchanged: none at all, or a `Sequence` of such
    (DeepSeek-V4's own tokenizer has an empty `Sequence`). Anything else is assumed to change text."""
    if normalizer is None:
        return True
    try:
        state = json.loads(normalizer.__getstate__())
    except Exception:  # noqa: BLE001 - a normalizer that cannot describe itself is not known to be the identity
        return False

    def identity(node: Any) -> bool:
        if not isinstance(node, dict) or node.get("type") != "Sequence":
            return False
        return all(identity(child) for child in node.get("normalizers", []))

    return identity(state)


def safe_split_tokens(backend: Any) -> tuple[frozenset[str], frozenset[str]]:
    """Added tokens at whose start (first set) or end (second set) a `tokenizers.Tokenizer` always cuts the text,
    so that encoding the pieces between such cuts separately gives exactly the ids of encoding the whole text.

    The backend first cuts the text at added-token matches (leftmost-longest), then normalizes, pre-tokenizes and
    runs the model on each piece alone. The start of an occurrence of added token S is a cut unless another added
    token t can straddle it (a proper suffix of t starts with S or is a prefix of S), S strips whitespace to its
    left, or S only matches whole words; its end is a cut too when S strips nothing to its right and no longer
    added token starts with S. Nothing is claimed when special tokens are encoded as text (`split_special_tokens`)
    or when added tokens are matched after a normalizer that may change the text (`is_identity_normalizer`: an
    identity normalizer, such as DeepSeek-V4's empty `Sequence`, matches them exactly as without one).
    """
    added = list(backend.get_added_tokens_decoder().values())
    contents = [t.content for t in added]
    if getattr(backend, "encode_special_tokens", False) or (
        not is_identity_normalizer(backend.normalizer) and any(t.normalized for t in added)
    ):
        return frozenset(), frozenset()  # special tokens encoded as text, or matched after normalization
    suffixes = {t[k:] for t in contents for k in range(1, len(t))}  # proper suffixes of every added token
    starts, ends = set(), set()
    for token in added:
        S = token.content
        if token.lstrip or token.single_word:
            continue
        if any(t.find(S, 1) != -1 for t in contents) or any(S[:j] in suffixes for j in range(1, len(S) + 1)):
            continue  # some added token can straddle the start of S
        starts.add(S)
        if not token.rstrip and not any(t != S and t.startswith(S) for t in contents):
            ends.add(S)
    return frozenset(starts), frozenset(ends)


_END = ""  # marks a whole token in a `_trie` (no character is the empty string)


def _trie(words: Iterable[str]) -> dict:
    """Nested dicts, one level per character; `_END` in a node marks the end of a word."""
    root: dict = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[_END] = True
    return root


class _Cutter:
    """Encodes a text as independent pieces cut at provably safe positions (see `safe_split_tokens`), with the ids
    of repeated prompt prefixes (system prompt + tools block) cached. Built once per tokenizer vocabulary."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.key = _cutter_key(backend)
        self.starts, self.ends = safe_split_tokens(backend)
        # character tries: the safe tokens forwards, and the safe end tokens backwards (DeepSeek-V4's tokenizer has
        # ~1,300 added tokens of 21 lengths: a walk is ~6x faster than a set lookup per length)
        self.start_trie, self.end_trie = _trie(self.starts), _trie(token[::-1] for token in self.ends)
        self.prefix_ids: dict[str, list[int]] = {}
        encode_fast = getattr(backend, "encode_batch_fast", None)  # ids without offsets (tokenizers >= 0.21)
        self.encode_batch = encode_fast or backend.encode_batch

    def is_cut(self, text: str, p: int) -> bool:
        if p <= 0 or p >= len(text):
            return True
        node = self.start_trie  # does a safe token start at p?
        for i in range(p, len(text)):
            node = node.get(text[i])
            if node is None:
                break
            if _END in node:
                return True
        node = self.end_trie  # does a safe end token end at p?
        for i in range(p - 1, -1, -1):
            node = node.get(text[i])
            if node is None:
                return False
            if _END in node:
                return True
        return False

    def prefix_end(self, text: str, candidates: Iterable[int], min_chars: int = 256) -> int:
        """The first cut among `candidates` at or after `min_chars` (0 if none): the end of a cacheable prefix."""
        return next((p for p in candidates if p >= min_chars and self.is_cut(text, p)), 0)

    def encode(
        self, text: str, spans: list[tuple[int, int]], prefix_end: int, cache_size: int
    ) -> tuple[list[int], list[tuple[int, int]]] | None:
        """(ids, token ranges of `spans`), or None when a span edge is not a safe cut."""
        edges = {p for span in spans for p in span}
        if not all(self.is_cut(text, p) for p in edges):
            return None
        bounds = sorted({0, len(text), prefix_end, *edges})
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        head: list[int] = []
        if prefix_end and cache_size > 0:
            head = self.prefix_ids.get(pieces[0])
            if head is None:
                if len(self.prefix_ids) >= cache_size:
                    self.prefix_ids.pop(next(iter(self.prefix_ids)))
                head = self.prefix_ids[pieces[0]] = self.backend.encode(pieces[0], add_special_tokens=False).ids
            pieces = pieces[1:]
        ids = list(head)
        token_at = {0: 0, bounds[1]: len(head)} if head else {0: 0}
        rest_bounds = bounds[2:] if head else bounds[1:]
        for bound, encoding in zip(rest_bounds, self.encode_batch(pieces, add_special_tokens=False)):
            ids += encoding.ids
            token_at[bound] = len(ids)
        return ids, [(token_at[s], token_at[e]) for s, e in spans if e > s]


_CUTTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cutter_key(backend: Any) -> tuple:
    """What a `_Cutter` depends on that can change on a live tokenizer."""
    return backend.get_vocab_size(with_added_tokens=True), getattr(backend, "encode_special_tokens", False)


def cutter_for(tokenizer: Any) -> _Cutter:
    """The cached cutter of `tokenizer` (made again when its backend, added tokens or flags changed)."""
    backend = tokenizer.backend_tokenizer
    cutter = _CUTTERS.get(tokenizer)
    if cutter is None or cutter.backend is not backend or cutter.key != _cutter_key(backend):
        cutter = _CUTTERS[tokenizer] = _Cutter(backend)  # new tokenizer, or its added tokens / flags changed
    return cutter


@dataclass
class ConversationTokenizer:
    """Turns conversations into `input_ids`, `attention_mask` and assistant-only `labels`.

    Call it on one conversation (`messages`, `tools`) to get a list of samples (one, or one per turn with
    `turns="per_turn"`, or none when an over-long sample is dropped). `stats` counts what happened; `log_stats()`
    reports it.

    Args:
        tokenizer, thinking_mode, drop_thinking, reasoning_effort, max_length, overlong, effort_profile: as in
            `tokenize_conversation`.
        turns: "all", "last", or "per_turn" (one sample per assistant turn, each with "last" labels).
        prefix_cache_size: how many tokenized conversation prefixes are kept for reuse.
        stats: the counters (a new `Counter` by default).

    Raises:
        ValueError: an unknown `turns` / `overlong` policy.
        ChatFormatError: an unknown option (at construction) or a malformed conversation (at a call).
        OverlongSampleError: an over-long sample under `overlong="raise"` (at a call).
    """

    tokenizer: Any
    thinking_mode: str = "thinking"
    drop_thinking: bool = True
    reasoning_effort: str | None = None
    turns: Literal["all", "last", "per_turn"] = "all"
    max_length: int | None = None
    overlong: Literal["truncate", "drop", "raise"] = "truncate"
    prefix_cache_size: int = 64
    effort_profile: str = DEFAULT_EFFORT_PROFILE
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        validate_policies(self.turns, self.overlong)
        check_options(self.thinking_mode, self.reasoning_effort, self.effort_profile)  # bad options fail here
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)

    def __call__(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> list[dict]:
        self.stats["conversations"] += 1
        if self.turns == "per_turn":
            pieces = [(prefix, "last") for prefix in turn_prefixes(messages)]
        else:
            pieces = [(messages, self.turns)]
        samples = []
        for prefix, turns in pieces:
            sample = self._one(prefix, tools, turns)
            if sample is not None:
                samples.append(sample)
        return samples

    def completion(
        self, prompt: Sequence[Mapping], completion: Sequence[Mapping], tools: Sequence[Mapping] | None = None
    ) -> list[dict]:
        """One sample of `prompt + completion` in which only the completion's assistant messages are trained (all
        of them, tool calls included), or none when it is dropped as over-long."""
        self.stats["conversations"] += 1
        sample = self._one([*prompt, *completion], tools, "all", train_from=len(prompt))
        return [sample] if sample is not None else []

    def _one(
        self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None, turns: str, train_from: int | None = None
    ) -> dict | None:
        attached = attach_tools(messages, tools)
        if train_from is not None:  # attach_tools may have inserted a leading system message
            first_trained = train_from + len(attached) - len(messages)
        else:
            first_trained = _trailing_assistants(attached) if turns == "last" else 0
        messages = attached
        segments = render_segments(
            messages, self.thinking_mode, self.drop_thinking, self.reasoning_effort,
            effort_profile=self.effort_profile,
        )  # fmt: skip
        spans, pos = [], 0
        for seg in segments:
            if seg.message_index is not None and seg.message_index >= first_trained:
                spans.append((pos, pos + len(seg.text)))
            pos += len(seg.text)
        text = "".join(seg.text for seg in segments)
        ids, ranges = self._tokenize(text, spans, segments)
        return self._fit(ids, ranges)

    def _tokenize(self, text: str, spans: list[tuple[int, int]], segments: Sequence) -> tuple[list[int], list]:
        """Token ids of `text` and the token ranges overlapping the char `spans`.

        Fast path: cut the text at the span edges (each right after `<think>`/`</think>`/a task token, or at EOS),
        which `safe_split_tokens` proves are token boundaries, and encode the pieces without offsets, reusing
        the cached ids of the system/tools prefix. Otherwise one encoding with offsets. Both give the ids of
        encoding the whole text (tested against `apply_chat_template`)."""
        backend = self._backend
        if backend is None or backend.truncation is not None or backend.padding is not None:
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return out["input_ids"], char_spans_to_token_mask_ranges(out["offset_mapping"], spans)
        cutter = cutter_for(self.tokenizer)
        prompt_ends = []  # candidate ends of a cacheable prefix: segment ends before the first trained span
        pos = 0
        for seg in segments:
            if seg.message_index is not None:
                break
            pos += len(seg.text)
            prompt_ends.append(pos)
        fast = cutter.encode(text, spans, cutter.prefix_end(text, prompt_ends), self.prefix_cache_size)
        if fast is not None:
            return fast
        self.stats["slow_path"] += 1
        enc = backend.encode(text, add_special_tokens=False)
        ranges = _encoding_ranges(enc, spans)
        return enc.ids, ranges if ranges is not None else char_spans_to_token_mask_ranges(enc.offsets, spans)

    def _fit(self, ids: list[int], ranges: list[tuple[int, int]]) -> dict | None:
        self.stats["samples"] += 1
        if self.max_length is not None and len(ids) > self.max_length:
            if self.overlong == "raise":
                raise OverlongSampleError(
                    f"sample has {len(ids)} tokens, more than max_length={self.max_length} (overlong='raise'); "
                    "use overlong='truncate' or 'drop', or raise max_length"
                )
            if self.overlong == "drop":
                self.stats["dropped_overlong"] += 1
                return None
            self.stats["truncated"] += 1
            ids = ids[: self.max_length]
        labels = [IGNORE_INDEX] * len(ids)
        trained = 0
        for a, b in ranges:
            b = min(b, len(ids))
            if b > a:
                labels[a:b] = ids[a:b]
                trained += b - a
        if not trained:
            self.stats["dropped_no_trainable_tokens"] += 1
            return None
        self.stats["kept"] += 1
        self.stats["tokens"] += len(ids)
        self.stats["trained_tokens"] += trained
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def log_stats(self) -> None:
        """Log how many samples were kept, truncated and dropped (and why)."""
        s = self.stats
        logger.info(
            "tokenized %d conversations into %d samples: kept %d, truncated %d, dropped %d over-long and %d with no "
            "trainable token; %d tokens, %d trained (max_length=%s, overlong=%s, turns=%s)",
            s["conversations"], s["samples"], s["kept"], s["truncated"], s["dropped_overlong"],
            s["dropped_no_trainable_tokens"], s["tokens"], s["trained_tokens"], self.max_length, self.overlong,
            self.turns,
        )  # fmt: skip


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    *,
    thinking_mode: str = "thinking",
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    turns: Literal["all", "last"] = "all",
    max_length: int | None = None,
    overlong: Literal["truncate", "drop", "raise"] = "truncate",
    effort_profile: str = DEFAULT_EFFORT_PROFILE,
) -> dict | None:
    """Tokenize one conversation: `{"input_ids", "attention_mask", "labels"}` (labels -100 outside trainable
    assistant spans), or None when the sample is dropped (over-long with `overlong="drop"`, or nothing to train).

    For one sample per turn use `ConversationTokenizer(..., turns="per_turn")`.

    Args:
        tokenizer: a tokenizer with DeepSeek-V4's vocabulary.
        messages: OpenAI-style messages.
        tools: tool schemas, attached to the leading system message as `apply_chat_template(..., tools=tools)` does.
        thinking_mode: "thinking" or "chat".
        drop_thinking: drop earlier turns' reasoning (as DeepSeek's encoder does without tools).
        reasoning_effort: the effort block (None: none), as `effort_profile` names them.
        turns: "all" (every assistant turn trained) or "last" (only the trailing assistant messages).
        max_length: the longest sample in tokens (None: no limit).
        overlong: what an over-long sample becomes: "truncate", "drop" or "raise".
        effort_profile: "0424" or "0731".

    Returns:
        The sample, or None when it is dropped.

    Raises:
        ValueError: `turns="per_turn"` or an unknown policy.
        ChatFormatError: a malformed conversation or an unknown option.
        OverlongSampleError: an over-long sample under `overlong="raise"`.
    """
    if turns == "per_turn":
        raise ValueError("turns='per_turn' gives several samples; use ConversationTokenizer(turns='per_turn')")
    samples = ConversationTokenizer(
        tokenizer, thinking_mode, drop_thinking, reasoning_effort, turns, max_length, overlong,
        effort_profile=effort_profile,
    )(messages, tools)  # fmt: skip
    return samples[0] if samples else None
