"""Packed training is exact per sample: samples laid end to end in one row (TRL's padding-free batches: position ids
restarting at 0, no attention mask) give each sample the logits and gradients it gets alone, under
`enable_sparse_attention` — the sliding window, the CSA / HCA compressed entries (blocks aligned to the sample's
start), the indexer's picks and the sinks see only the sample's own tokens. In float64 to 1e-10; in float32 as close
to the float64 computation as stock's float32 of the sample alone is (`numerics`)."""

from __future__ import annotations

import copy

import pytest
import torch
from numerics import assert_as_accurate_as_stock, float64_throughout
from transformers import DeepseekV4ForCausalLM

from hf_dsv4.modeling import SparseAttentionError, enable_sparse_attention, packed_samples
from hf_dsv4.testing.model import tiny_dsv4_model

TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
# the tiny model compresses 4 tokens per CSA entry, 8 per HCA entry; its window is 8 tokens. Lengths that are
# multiples of both (32, 8), of neither (13, 21), shorter than one block (3, 1), longer than the window.
LENGTHS = [13, 32, 3, 21, 8, 40, 1]


def _model(dtype: torch.dtype, seed: int = 0, layer_types=TYPES * 2, sparse: bool = True) -> DeepseekV4ForCausalLM:
    """The tiny model (random sinks and position biases) with real top-k selection (the indexer keeps 3 of up to 10
    entries), under sparse attention unless `sparse=False` (transformers' own)."""
    model = tiny_dsv4_model(layer_types, dtype, seed, index_topk=3)
    return enable_sparse_attention(model, chunk_size=5) if sparse else model


def _samples(lengths, seed: int = 1, vocab: int = 1000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]


def _weights(samples, vocab: int, seed: int = 2) -> list[torch.Tensor]:
    """A fixed random weight per logit: the loss `sum(logits * weight)` makes every gradient depend on every logit."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(len(s), vocab, generator=generator, dtype=torch.float64) for s in samples]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def alone(model, samples, weights) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Each sample run by itself (a batch of one row, default positions): its logits, and the gradients of the sum
    of the samples' losses."""
    model.zero_grad()
    logits = []
    for ids, weight in zip(samples, weights, strict=True):
        out = model(input_ids=ids[None]).logits[0]
        (out * weight.to(out.dtype)).sum().backward()
        logits.append(out.detach())
    return logits, _grads(model)


def packed(model, rows, weights, pad_to: int | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """`rows` (lists of samples) laid end to end per row, positions restarting per sample, rows padded to `pad_to`
    with pad tokens at position 0 (TRL's padding-free collator pads so); the samples' logits in order."""
    width = pad_to or max(sum(len(s) for s in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            ids[r, start : start + len(sample)] = sample
            positions[r, start : start + len(sample)] = torch.arange(len(sample))
            spans.append((r, start, start + len(sample)))
            start += len(sample)
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions).logits
    loss = sum((out[r, a:b] * w.to(out.dtype)).sum() for (r, a, b), w in zip(spans, weights, strict=True))
    loss.backward()
    return [out[r, a:b].detach() for r, a, b in spans], _grads(model)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def _assert_same(got, want, tolerance: float) -> None:
    (got_logits, got_grads), (want_logits, want_grads) = got, want
    for index, (a, b) in enumerate(zip(got_logits, want_logits, strict=True)):
        assert _rel(a, b) < tolerance, (index, _rel(a, b))
    assert sorted(got_grads) == sorted(want_grads) and len(got_grads) > 60
    worst = {n: _rel(got_grads[n], want_grads[n]) for n in want_grads if want_grads[n].abs().max() > 1e-12}
    assert max(worst.values()) < tolerance, max(worst.items(), key=lambda item: item[1])


@pytest.mark.parametrize("rows", [[LENGTHS], [LENGTHS[:3], LENGTHS[3:]]], ids=["one-row", "two-rows-padded"])
def test_float64_each_packed_sample_gets_its_logits_and_gradients_alone(rows):
    """Seven samples in one row, or in two rows padded to 72 tokens (pad tokens at position 0, as TRL pads). In
    float64 throughout (`numerics.float64_throughout`: transformers' float32 islands kept in float64 too)."""
    model = _model(torch.float64)
    samples = _samples(LENGTHS)
    weights = _weights(samples, model.config.vocab_size)
    grouped, at = [], 0
    for row in rows:
        grouped.append(samples[at : at + len(row)])
        at += len(row)
    with float64_throughout():
        want = alone(model, samples, weights)
        got = packed(model, grouped, weights, pad_to=None if len(rows) == 1 else 72)
    _assert_same(got, want, 1e-10)


def test_float64_lora_gradients_are_each_samples_alone():
    """peft's LoRA on every DeepSeek-V4 target (routed experts included), its B factors non-zero."""
    from peft import get_peft_model

    from hf_dsv4.training.lora import dsv4_lora_config

    model = get_peft_model(_model(torch.float64), dsv4_lora_config(r=4, targets="all", init_lora_weights=False))
    samples = _samples(LENGTHS)
    weights = _weights(samples, model.config.vocab_size)
    with float64_throughout():
        got, want = packed(model, [samples], weights), alone(model, samples, weights)
    assert sum(".lora_" in name for name in got[1]) > 20
    _assert_same(got, want, 1e-10)


def test_float32_packed_samples_are_as_close_to_float64_as_stock_alone(threads):
    """Each packed sample's float32 logits and gradients are no further from the float64 computation of the samples
    alone than transformers' own (dense) float32 attention of the samples alone is (`numerics`)."""
    ours, stock = _model(torch.float32), _model(torch.float32, sparse=False)
    truth = _model(torch.float64)
    samples = _samples(LENGTHS)
    weights = _weights(samples, ours.config.vocab_size)
    (got, got_grads), (want, want_grads) = packed(ours, [samples], weights), alone(stock, samples, weights)
    with float64_throughout():
        true_logits, true_grads = alone(truth, samples, weights)
    for index, (a, b, c) in enumerate(zip(got, want, true_logits, strict=True)):
        assert_as_accurate_as_stock(a, b, c, f"logits of sample {index}")
    assert sorted(got_grads) == sorted(want_grads) == sorted(true_grads)
    for name, grad in want_grads.items():
        assert_as_accurate_as_stock(got_grads[name], grad, true_grads[name], name)


def test_a_sample_does_not_depend_on_its_neighbours_or_its_offset():
    """The same sample after different neighbours, at different offsets: the same logits bit for bit in float64
    up to the summation order of the matmuls (1e-12)."""
    model = _model(torch.float64)
    first, second, third = _samples([21, 13, 30])
    with torch.no_grad(), float64_throughout():
        a = model(input_ids=torch.cat([first, third])[None], position_ids=_positions([21, 30])).logits[0, 21:]
        b = model(input_ids=torch.cat([second, third])[None], position_ids=_positions([13, 30])).logits[0, 13:]
    assert _rel(a, b) < 1e-12


def _positions(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_packed_samples_reads_the_spans_from_the_positions():
    assert packed_samples(torch.arange(9)[None], 2) is None
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert packed_samples(positions, 2) == [[(0, 3), (3, 5), (5, 6), (6, 7), (7, 8)], [(0, 6), (6, 8)]]


def test_a_mask_of_ones_is_dropped_and_padding_in_packed_rows_is_refused():
    """Transformers keeps packed samples apart only without an attention mask: a mask of ones says nothing more (the
    same logits as none); one with padding in packed rows cannot be served exactly and is refused."""
    model = _model(torch.float64)
    ids = torch.cat(_samples([13, 19]))[None]
    positions = _positions([13, 19])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=positions).logits
        got = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(got, want)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        with pytest.raises(SparseAttentionError, match="packed rows"):
            model(input_ids=ids, position_ids=positions, attention_mask=mask)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_under_fsdp2_each_ranks_packed_samples_get_their_logits_and_gradients_alone(tiny_ckpt, tmp_path):
    """2 gloo ranks, FSDP2, LoRA on every target, float64 throughout: each rank packs its own four samples into one
    row; the logits of every sample and every gradient (reduced over ranks) are those of the samples run alone, to
    1e-10; with decoder layers checkpointed the packed step is the same bit for bit."""
    from dist_launch import run_ranks

    for result in run_ranks("packed", tmp_path, str(tiny_ckpt), timeout=280):
        assert result["same_grads"] and result["grads"] == result["lora_grads"] > 40, result
        assert result["logits"] < 1e-10 and result["worst_grad"] < 1e-10, result
        assert result["checkpointed_equal"], result


def test_the_flex_kernel_keeps_packed_samples_apart_too():
    """`kernel="flex"` (its forward, on CPU: torch has no CPU flex backward): the block mask keeps each packed sample
    to its own window and its own compressed entries, as the portable path does (float64 throughout, 1e-12)."""
    portable = _model(torch.float64)
    flex = enable_sparse_attention(copy.deepcopy(portable), chunk_size=5, kernel="flex")
    ids, positions = torch.cat(_samples(LENGTHS))[None], _positions(LENGTHS)
    with torch.no_grad(), float64_throughout():
        want, got = (m(input_ids=ids, position_ids=positions).logits for m in (portable, flex))
    assert _rel(got, want) < 1e-12


def test_the_packing_benchmark_feeds_both_ways_the_same_samples_through_trls_collators():
    """`benchmarks/bench_packing.py`'s data: the same tokens both ways; padded batches pad (labels -100) and carry an
    attention mask, packed ones are single rows whose positions restart at each of their samples, with no pad."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(samples=12, min_len=16, max_len=256, batch=2)
    lengths = bench.lengths(args)
    assert min(lengths) >= 16 and max(lengths) <= 256 and len(set(lengths)) > 6
    padded, packed = bench.batches(args, "padded"), bench.batches(args, "packed")
    assert sum(int(b["attention_mask"].sum()) for b in padded) == sum(lengths)
    assert all((b["labels"][b["attention_mask"] == 0] == -100).all() for b in padded)
    assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in packed)
    assert sum(b["input_ids"].numel() for b in packed) == sum(lengths)
    starts = sorted(int(n) for b in packed for n in torch.diff(b["cu_seq_lens_q"]))
    assert starts == sorted(lengths) and sum(int((b["position_ids"] == 0).sum()) for b in packed) == len(lengths)


def test_traced_position_ids_are_taken_as_unpacked():
    """Under `FakeTensorMode` (the Flash rehearsal traces the real step so) position ids have no values to read
    samples from: they are taken as one sequence per row, what the rehearsal traces."""
    from hf_dsv4 import compat

    with compat.fake_tensor_mode():
        fake = torch.arange(16)[None]
        assert compat.is_fake(fake) and packed_samples(fake, 1) is None
    assert not compat.is_fake(torch.arange(3))
