"""Tokenization with assistant-only labels: exact spans, turn policies, over-long policies."""

import logging
import os

import pytest
from samples import MULTI_TURN, load_fixture

from hf_dsv4.template import encode_messages
from hf_dsv4.template import tokens as T
from hf_dsv4.template.tokenization import (
    ConversationTokenizer,
    OverlongSampleError,
    char_spans_to_token_mask_ranges,
    tokenize_conversation,
    turn_prefixes,
)
from hf_dsv4.testing import deepseek_v4_tokenizer, tiny_tokenizer

E = T.EOS
# every test taking `tokenizer` runs on the tiny test tokenizer and on DeepSeek-V4's own (129,280 ids)
TOKENIZERS = {"tiny": tiny_tokenizer, "deepseek": deepseek_v4_tokenizer}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(tokenizer_kind):
    return TOKENIZERS[tokenizer_kind]()


def trained_pieces(tok, sample):
    """Decode each maximal run of trained tokens."""
    pieces, run = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            pieces.append(tok.decode(run))
            run = []
    if run:
        pieces.append(tok.decode(run))
    return pieces


def stock_mask(offsets, spans):
    """transformers' own loop for return_assistant_tokens_mask, written out independently."""
    mask = [0] * len(offsets)
    for i, (ts, te) in enumerate(offsets):
        mask[i] = int(any(te > s and ts < e for s, e in spans))
    return mask


def test_input_ids_are_the_tokenized_reference_text(tokenizer):
    messages, mode, expected = load_fixture(1)
    sample = tokenize_conversation(tokenizer, messages, thinking_mode=mode)
    assert sample["input_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert sample["attention_mask"] == [1] * len(sample["input_ids"])


def test_labels_cover_reasoning_think_end_content_dsml_and_eos_of_each_assistant_turn(tokenizer):
    messages, mode, _ = load_fixture(1)
    sample = tokenize_conversation(tokenizer, messages, thinking_mode=mode)
    assert trained_pieces(tokenizer, sample) == [
        "The user wants to know the weather in Beijing. I should use the get_weather tool.</think>\n\n"
        '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{E}",
        "Got the weather data. Let me format a nice response.</think>The weather in Beijing is currently sunny "
        f"with a temperature of 22°C and 45% humidity.{E}",
    ]


def test_task_answers_are_trained_after_the_task_token(tokenizer):
    messages, mode, _ = load_fixture(4)
    pieces = trained_pieces(tokenizer, tokenize_conversation(tokenizer, messages, thinking_mode=mode))
    assert pieces[-1] == f"Search{E}"
    assert len(pieces) == 2


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_labels_equal_the_overlap_rule_of_transformers_on_the_fixtures(tokenizer, case):
    messages, mode, _ = load_fixture(case)
    from hf_dsv4.template import render_segments

    segments = render_segments(messages, thinking_mode=mode)
    spans, pos = [], 0
    for seg in segments:
        if seg.message_index is not None:
            spans.append((pos, pos + len(seg.text)))
        pos += len(seg.text)
    enc = tokenizer.backend_tokenizer.encode("".join(s.text for s in segments), add_special_tokens=False)
    sample = tokenize_conversation(tokenizer, messages, thinking_mode=mode)
    assert [int(label != -100) for label in sample["labels"]] == stock_mask(enc.offsets, spans)


def test_mask_ranges_include_tokens_straddling_a_span_edge():
    offsets = [(0, 2), (2, 5), (5, 9), (9, 9), (9, 12)]
    assert char_spans_to_token_mask_ranges(offsets, [(3, 6)]) == [(1, 3)]
    assert char_spans_to_token_mask_ranges(offsets, [(5, 9)]) == [(2, 3)]
    assert char_spans_to_token_mask_ranges(offsets, [(12, 12)]) == []


def test_turns_all_trains_earlier_turns_as_rendered_without_their_reasoning(tokenizer):
    sample = tokenize_conversation(tokenizer, MULTI_TURN)
    assert trained_pieces(tokenizer, sample) == [f"Hi!{E}", f"easy</think>Paris.{E}"]


def test_turns_last_trains_only_the_trailing_assistant_messages(tokenizer):
    sample = tokenize_conversation(tokenizer, MULTI_TURN, turns="last")
    assert trained_pieces(tokenizer, sample) == [f"easy</think>Paris.{E}"]


def test_turns_per_turn_gives_one_sample_per_turn_each_rendered_as_at_inference(tokenizer):
    samples = ConversationTokenizer(tokenizer, turns="per_turn")(MULTI_TURN)
    assert [trained_pieces(tokenizer, s) for s in samples] == [[f"greet</think>Hi!{E}"], [f"easy</think>Paris.{E}"]]
    assert tokenizer.decode(samples[0]["input_ids"]) == encode_messages(MULTI_TURN[:3])
    assert tokenizer.decode(samples[1]["input_ids"]) == encode_messages(MULTI_TURN)


def test_turn_prefixes_cut_after_each_run_of_assistant_messages():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "c"},
    ]
    assert [len(p) for p in turn_prefixes(msgs)] == [3, 5]


def test_tools_argument_is_attached_to_the_leading_system_message(tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_system = tokenize_conversation(tokenizer, MULTI_TURN, tools)
    expected = encode_messages([{**MULTI_TURN[0], "tools": tools}, *MULTI_TURN[1:]])
    assert tokenizer.decode(with_system["input_ids"]) == expected
    without_system = tokenize_conversation(tokenizer, MULTI_TURN[1:], tools)
    expected = encode_messages([{"role": "system", "content": "", "tools": tools}, *MULTI_TURN[1:]])
    assert tokenizer.decode(without_system["input_ids"]) == expected


def test_overlong_truncate_keeps_the_first_max_length_tokens_and_counts_it(tokenizer, caplog):
    full = tokenize_conversation(tokenizer, MULTI_TURN)
    n = len(full["input_ids"]) - 3
    ct = ConversationTokenizer(tokenizer, max_length=n, overlong="truncate")
    [sample] = ct(MULTI_TURN)
    assert sample["input_ids"] == full["input_ids"][:n]
    assert sample["labels"] == full["labels"][:n]
    with caplog.at_level(logging.INFO, logger="hf_dsv4.template.tokenization"):
        ct.log_stats()
    assert ct.stats["truncated"] == 1 and ct.stats["kept"] == 1
    assert "truncated 1" in caplog.text


def test_overlong_drop_returns_nothing_and_counts_it(tokenizer):
    ct = ConversationTokenizer(tokenizer, max_length=5, overlong="drop")
    assert ct(MULTI_TURN) == []
    assert ct.stats["dropped_overlong"] == 1
    assert tokenize_conversation(tokenizer, MULTI_TURN, max_length=5, overlong="drop") is None


def test_overlong_raise_names_the_lengths(tokenizer):
    with pytest.raises(OverlongSampleError, match=r"more than max_length=5"):
        tokenize_conversation(tokenizer, MULTI_TURN, max_length=5, overlong="raise")


def test_truncation_that_removes_every_trained_token_drops_the_sample(tokenizer):
    ct = ConversationTokenizer(tokenizer, max_length=4)
    assert ct(MULTI_TURN) == []
    assert ct.stats["truncated"] == 1 and ct.stats["dropped_no_trainable_tokens"] == 1


def test_bad_policy_names_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="turns must be one of"):
        ConversationTokenizer(tokenizer, turns="first")
    with pytest.raises(ValueError, match="overlong must be one of"):
        ConversationTokenizer(tokenizer, overlong="wrap")


def test_fast_path_with_prefix_cache_gives_the_ids_of_encoding_the_whole_text(tokenizer_kind):
    from hf_dsv4.template.tokenization import cutter_for

    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 300, "parameters": {}}}]
    convs = [MULTI_TURN, MULTI_TURN[:3], load_fixture(1)[0]]
    tok = TOKENIZERS[tokenizer_kind]()  # a fresh tokenizer: a fresh prefix cache
    cached = ConversationTokenizer(tok)
    uncached = ConversationTokenizer(tok, prefix_cache_size=0)
    for messages in convs:
        text = encode_messages([{**messages[0], "tools": [*(messages[0].get("tools") or []), *tools]}, *messages[1:]])
        whole = tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(2):
            [sample] = cached(messages, tools)
            assert sample["input_ids"] == whole
            assert sample == uncached(messages, tools)[0]
    assert cached.stats["slow_path"] == 0
    prefixes = cutter_for(tok).prefix_ids
    assert len(prefixes) == 2  # MULTI_TURN and MULTI_TURN[:3] share their system prompt and tools block
    for prefix, ids in prefixes.items():
        assert prefix.startswith(T.BOS) and ids == tok(prefix, add_special_tokens=False)["input_ids"]


def test_span_edges_that_are_not_safe_cuts_take_the_slow_path_with_the_same_result(tokenizer):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "open end", "wo_eos": True}]
    ct = ConversationTokenizer(tokenizer)
    [sample] = ct([{"role": "system", "content": "s"}, *msgs, {"role": "user", "content": "more"}])
    assert ct.stats["slow_path"] == 0  # the open span ends right before <｜User｜>: still a safe cut
    msgs = [{"role": "system", "content": "sys"}, {"role": "assistant", "content": "right after the system"}]
    ct = ConversationTokenizer(tokenizer, thinking_mode="chat")
    [sample] = ct(msgs)
    assert ct.stats["slow_path"] == 1  # in chat mode the span starts right after plain system text
    text = encode_messages(msgs, thinking_mode="chat")
    assert sample["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert trained_pieces(tokenizer, sample) == [f"right after the system{E}"]


def test_deepseeks_own_tokenizer_is_cut_at_its_special_tokens_its_empty_normalizer_being_the_identity():
    """DeepSeek-V4's tokenizer has a normalizer (an empty `Sequence`) and marks its added tokens `normalized`: the
    identity is recognised, so the fast path cuts at the special tokens (and never takes the slow path here)."""
    from tokenizers import normalizers

    from hf_dsv4.template.tokenization import is_identity_normalizer, safe_split_tokens

    tok = deepseek_v4_tokenizer()
    assert type(tok.backend_tokenizer.normalizer).__name__ == "Sequence"
    starts, ends = safe_split_tokens(tok.backend_tokenizer)
    assert {T.USER, T.ASSISTANT, T.THINK_START, T.THINK_END, T.EOS} <= starts and {T.THINK_START, T.EOS} <= ends
    ct = ConversationTokenizer(tok)
    for case in (1, 2, 3, 4):
        messages, mode, expected = load_fixture(case)
        [sample] = ConversationTokenizer(tok, thinking_mode=mode)(messages)
        assert sample["input_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    ct(MULTI_TURN)
    assert ct.stats["slow_path"] == 0
    identity = [None, normalizers.Sequence([]), normalizers.Sequence([normalizers.Sequence([])])]
    changing = [normalizers.NFC(), normalizers.Sequence([normalizers.Lowercase()]), normalizers.Strip()]
    assert all(map(is_identity_normalizer, identity)) and not any(map(is_identity_normalizer, changing))


def test_a_cut_is_where_a_safe_token_starts_or_a_safe_end_token_ends(tokenizer):
    """`_Cutter.is_cut` (character tries) against the definition, at every position of the official fixtures."""
    from hf_dsv4.template.tokenization import cutter_for

    cutter = cutter_for(tokenizer)

    def occurrences(text, token):
        at = text.find(token)
        while at != -1:
            yield at
            at = text.find(token, at + 1)

    for case in (1, 2, 3, 4):
        text = load_fixture(case)[2]
        cuts = {0, len(text)} | {at for t in cutter.starts for at in occurrences(text, t)}
        cuts |= {at + len(t) for t in cutter.ends for at in occurrences(text, t)}
        assert [p for p in range(len(text) + 1) if cutter.is_cut(text, p)] == sorted(cuts), case


def test_a_token_that_can_straddle_a_special_token_makes_it_unsafe_to_split_before():
    from tokenizers import AddedToken

    from hf_dsv4.template.tokenization import safe_split_tokens

    tok = tiny_tokenizer()
    starts, ends = safe_split_tokens(tok.backend_tokenizer)
    assert {T.USER, T.ASSISTANT, T.THINK_START, T.EOS} <= starts and {T.THINK_START, T.EOS} <= ends
    tok.add_tokens(["x<｜User｜>", "<think>!", AddedToken("<｜Assistant｜>", lstrip=True, special=True)])
    starts, ends = safe_split_tokens(tok.backend_tokenizer)
    assert T.USER not in starts and T.ASSISTANT not in starts and T.EOS in starts
    assert T.THINK_START in starts and T.THINK_START not in ends  # "<think>!" may be matched instead
    tok.backend_tokenizer.encode_special_tokens = True  # what split_special_tokens=True sets
    assert safe_split_tokens(tok.backend_tokenizer) == (frozenset(), frozenset())


# ------------------------------------------------------------------ equality with the Jinja template's mask

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import conversations  # noqa: E402

from hf_dsv4.template import install_chat_template  # noqa: E402

_TEMPLATED = {kind: install_chat_template(make()) for kind, make in TOKENIZERS.items()}


@settings(
    max_examples=int(os.environ.get("HF_DSV4_EXAMPLES", 80)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(conversation=conversations(), mode=st.sampled_from(["thinking", "chat"]), drop=st.booleans())
@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_labels_equal_the_jinja_assistant_mask_and_ids_equal_apply_chat_template(kind, conversation, mode, drop):
    messages, tools = conversation
    templated = _TEMPLATED[kind]
    stock = templated.apply_chat_template(
        messages,
        tools=tools,
        thinking_mode=mode,
        drop_thinking=drop,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    sample = tokenize_conversation(templated, messages, tools, thinking_mode=mode, drop_thinking=drop)
    if sample is None:  # nothing to train: the template marks nothing either
        assert 1 not in stock["assistant_masks"]
        return
    assert sample["input_ids"] == stock["input_ids"]
    assert [int(label != -100) for label in sample["labels"]] == stock["assistant_masks"]


def test_split_special_tokens_is_honoured_after_the_cutter_was_built():
    tok = tiny_tokenizer()
    [before] = ConversationTokenizer(tok)(MULTI_TURN)
    tok.backend_tokenizer.encode_special_tokens = True  # special tokens now encode as plain text
    ct = ConversationTokenizer(tok)
    [after] = ct(MULTI_TURN)
    assert after["input_ids"] == tok.backend_tokenizer.encode(encode_messages(MULTI_TURN), add_special_tokens=False).ids
    assert len(after["input_ids"]) > len(before["input_ids"]) and ct.stats["slow_path"] == 1
