"""Tolerances from the arithmetic, not from one CPU.

A float32 result of ours is judged against the float64 computation of the same thing (the same model and inputs in
float64), by how far it is from it in ulps of the tensor's scale: max |x - truth| / max |truth| / eps(float32). It may
be off by at most `FACTOR` times what the stock float32 path is off in the same run, plus `FLOOR_ULPS` (for a tensor
stock happens to compute almost exactly). A gradient whose exact value is ~0 (the hash router's weight, terms that
cancel) is off by many ulps of its own scale in stock too; the factor carries it.

Why these numbers (tiny DeepSeek-V4, all three attention types, 45 tokens, sparse attention vs transformers'): over
torch's thread counts 1 and 2 and its vector paths (`ATEN_CPU_CAPABILITY=default` / `avx2`, which reproduce the
summation orders another CPU takes), ours was off at most 5.5x stock's error where stock's was >= 4 ulps, and at
most 12.6 ulps where stock's was < 4 ulps. The old bound (ours within 1e-5 of stock, about 84 ulps, with a list of
exempt tensors) failed on an Intel Xeon: the hyper-connection head's gradient sums terms that cancel, and two valid
float32 summation orders land 150 ulps apart there while both are within 50-125 ulps of float64.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

FACTOR = 10
FLOOR_ULPS = 32


def ulps_off(got: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """How far `got` is from the float64 `truth`: the largest difference in `dtype` epsilons of max |truth|."""
    scale = truth.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((got.double() - truth.double()).abs().max() / scale / torch.finfo(dtype).eps).item()


def assert_as_accurate_as_stock(got: torch.Tensor, stock: torch.Tensor, truth: torch.Tensor, what: str = "") -> None:
    """`got` (ours) is no further from the float64 `truth` than `FACTOR` x stock's own distance + `FLOOR_ULPS`."""
    ours, theirs = ulps_off(got, truth), ulps_off(stock, truth)
    assert ours <= FACTOR * theirs + FLOOR_ULPS, f"{what}: {ours:.1f} ulps off float64, stock {theirs:.1f}"


def in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `model` (a transformers model or a PeftModel over one), the oracle of a float32 comparison:
    its routed experts run the eager loop (grouped_mm has no float64)."""
    oracle = copy.deepcopy(model).double()
    base = oracle.get_base_model() if hasattr(oracle, "get_base_model") else oracle
    base.set_experts_implementation("eager")
    return oracle


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count for a block (another summation order in every parallel reduction)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Float64Throughout(torch.overrides.TorchFunctionMode):
    """Turns every request for float32 into float64: `t.float()`, `t.to(torch.float32)`, `softmax(...,
    dtype=torch.float32)`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            return args[0].double()
        if func is torch.Tensor.to:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        if kwargs.get("dtype") is torch.float32 and "softmax" in getattr(func, "__name__", ""):
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_throughout() -> Iterator[None]:
    """A float64 model computed in float64 everywhere. transformers' DeepSeek-V4 computes its hyper-connections,
    norms, rope, compressor gates and indexer scores in float32 whatever the model's dtype (and `from_pretrained`
    keeps those modules' weights in float32), so a float64 model still rounds to float32 there, and two exact
    evaluations of the same sample at different matrix shapes (a sample alone, the same sample packed in a row)
    differ by float32 roundings (~1 ulp of float32 in the logits; far more in gradients that sum cancelling terms).
    Inside this block every float32 request is a float64 one: what remains is float64 rounding."""
    with _Float64Throughout():
        yield
