"""`enable_sparse_attention`: DeepSeek-V4 attention read sparsely (window blocks, the indexer's picks, the causal
HCA entries, chunked indexer scores) computes what transformers' dense eager attention computes: in float64 the
same numbers to rounding (1e-12), in float32 as close to float64 as stock is (`numerics`), with padding, packed sequences,
lengths off the compression ratios and the window, LoRA; with a cache it is stock, bit for bit. The largest tensor
it makes grows linearly with the sequence (stock's quadratically)."""

from __future__ import annotations

import copy

import pytest
import torch
from numerics import assert_as_accurate_as_stock
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DeepseekV4ForCausalLM

from hf_dsv4 import compat
from hf_dsv4.modeling import SparseAttentionError, enable_sparse_attention, sparse_attention_enabled, sparse_layer
from hf_dsv4.modeling import sparse_attention as sparse_module
from hf_dsv4.testing.model import tiny_dsv4_model

TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]


def _model(layer_types: list[str], dtype: torch.dtype, seed: int = 0, **overrides) -> DeepseekV4ForCausalLM:
    """The tiny model with random sinks / position biases and real top-k selection (the indexer keeps 3)."""
    overrides.setdefault("index_topk", 3)
    return tiny_dsv4_model(layer_types, dtype, seed, **overrides)


def _inputs(length: int, seed: int = 1, left_pad: int = 7, vocab: int = 1000) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def _step(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def _pair(layer_types, dtype, chunk_size, **overrides):
    stock = _model(layer_types, dtype, **overrides)
    return stock, enable_sparse_attention(copy.deepcopy(stock), chunk_size=chunk_size)


@pytest.mark.parametrize(
    "layer_type,length,chunk,topk",
    [(t, 48, 16, 3) for t in TYPES] + [(t, 45, 5, 3) for t in TYPES] + [("compressed_sparse_attention", 45, 5, 8)],
)
def test_float64_logits_and_every_gradient_are_stocks(layer_type, length, chunk, topk):
    """48: a multiple of both compression ratios (4, 8), of the window (8) and of the chunk; 45: none of them.
    Row 1 is left-padded (7 tokens). The indexer keeps 3 of up to 12 entries per query (gathered per query), or 8
    (every entry read, the picks as a mask)."""
    stock, sparse = _pair([layer_type, layer_type], torch.float64, chunk, index_topk=topk)
    inputs = _inputs(length)
    (want, want_grads), (got, got_grads) = _step(stock, inputs), _step(sparse, inputs)
    assert _rel(got, want) < 1e-12
    assert sorted(got_grads) == sorted(want_grads) and len(got_grads) > 40
    worst = max(_rel(got_grads[n], want_grads[n]) for n in want_grads if want_grads[n].abs().max() > 1e-12)
    assert worst < 1e-10


def test_packed_sequences_and_the_stock_mask_function_are_followed():
    """No attention mask and position ids that restart: without a cache transformers builds a packed-sequence mask
    (each sequence's window sees only itself); the sparse mask evaluates the same mask function. Sliding-window layers
    only: there stock keeps packed samples apart too (its compressors read the whole row; ours read each sample's own
    tokens, `test_packing`)."""
    stock, sparse = _pair(["sliding_attention"] * 2, torch.float64, 7)
    inputs = _inputs(40, left_pad=0)
    del inputs["attention_mask"]
    inputs["position_ids"] = torch.cat([torch.arange(17), torch.arange(23)]).expand(2, -1)
    (want, want_grads), (got, got_grads) = _step(stock, {**inputs, "use_cache": False}), _step(sparse, inputs)
    assert _rel(got, want) < 1e-12
    assert max(_rel(got_grads[n], want_grads[n]) for n in want_grads if want_grads[n].abs().max() > 1e-12) < 1e-10
    unpacked = _step(sparse, {k: v for k, v in inputs.items() if k != "position_ids"})[0]
    assert _rel(unpacked[:, 17:], got[:, 17:]) > 1e-3  # the packing mattered


def _float32_and_truth(stock, sparse, inputs):
    """(stock's, ours, float64's) logits and gradients; the float64 model is stock's, in float64."""
    truth = copy.deepcopy(stock).double()
    return _step(stock, inputs), _step(sparse, inputs), _step(truth, inputs)


def test_float32_logits_and_every_gradient_are_as_close_to_float64_as_stocks(threads):
    """Logits and every gradient no further from the float64 computation than stock's float32 is (`numerics`: 10x
    stock's error + 32 ulps of the tensor's scale), under 1 and 2 threads: the hyper-connection head and the hash
    router's weight, whose gradients sum terms that cancel, included."""
    stock, sparse = _pair(TYPES, torch.float32, 5)
    (want, want_grads), (got, got_grads), (truth, true_grads) = _float32_and_truth(stock, sparse, _inputs(45))
    assert_as_accurate_as_stock(got, want, truth, "logits")
    assert sorted(got_grads) == sorted(want_grads) == sorted(true_grads) and len(got_grads) > 40
    for name, grad in want_grads.items():
        assert_as_accurate_as_stock(got_grads[name], grad, true_grads[name], name)


def test_lora_logits_and_gradients_in_float32_are_as_close_to_float64_as_stocks(threads):
    from peft import get_peft_model

    from hf_dsv4.training.lora import dsv4_lora_config

    stock = _model(TYPES, torch.float32)
    stock = get_peft_model(stock, dsv4_lora_config(r=4, alpha=8, targets="attention+shared"))
    with torch.no_grad():
        for name, param in stock.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    sparse = enable_sparse_attention(copy.deepcopy(stock), chunk_size=6)
    assert sparse_attention_enabled(sparse) and not sparse_attention_enabled(stock)
    (want, want_grads), (got, got_grads), (truth, true_grads) = _float32_and_truth(stock, sparse, _inputs(45))
    assert_as_accurate_as_stock(got, want, truth, "logits")
    assert sorted(got_grads) == sorted(want_grads) and all("lora_" in n for n in got_grads) and len(got_grads) > 20
    for name, grad in want_grads.items():
        assert_as_accurate_as_stock(got_grads[name], grad, true_grads[name], name)


def test_bfloat16_follows_stock_to_rounding():
    stock, sparse = _pair(TYPES, torch.bfloat16, 5)
    inputs = _inputs(45)
    (want, _), (got, _) = _step(stock, inputs), _step(sparse, inputs)
    assert _rel(got, want) < 2**-6


def test_with_a_cache_it_is_stock_bit_for_bit():
    """Generation (a cache, one query at a time after the prompt): the dense stock path, the same tokens and logits."""
    stock, sparse = _pair(TYPES, torch.float32, 5)
    ids = _inputs(21)["input_ids"][:1]
    with torch.no_grad():
        want = stock(input_ids=ids, use_cache=True).logits
        got = sparse(input_ids=ids, use_cache=True).logits
        assert torch.equal(got, want)
        generated = [m.generate(ids, max_new_tokens=12, do_sample=False) for m in (stock, sparse)]
    assert torch.equal(*generated) and generated[0].shape[1] == 33


def test_enable_is_idempotent_and_refuses_what_it_cannot_serve():
    model = _model(TYPES, torch.float32)
    assert enable_sparse_attention(model, chunk_size=7) is model
    layers = [sparse_layer(m.self_attn) for m in model.model.layers]
    hooks = [len(m.self_attn._forward_pre_hooks) for m in model.model.layers]
    enable_sparse_attention(model, chunk_size=9)
    assert [sparse_layer(m.self_attn) for m in model.model.layers] == layers and {x.chunk for x in layers} == {9}
    assert [len(m.self_attn._forward_pre_hooks) for m in model.model.layers] == hooks  # hooked once
    for m in model.model.layers[1:]:  # the compressor shares its layer's hand-off; its class stays transformers'
        assert sparse_layer(m.self_attn.compressor) is sparse_layer(m.self_attn)
        assert type(m.self_attn.compressor).__module__.startswith("transformers.")
    with pytest.raises(SparseAttentionError, match="chunk_size must be positive, got 0"):
        enable_sparse_attention(model, chunk_size=0)
    with pytest.raises(SparseAttentionError, match="Linear has no DeepSeek-V4 attention layer"):
        enable_sparse_attention(torch.nn.Linear(2, 2))


def test_a_changed_transformers_source_is_refused(monkeypatch):
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as stock

    def forward(self, hidden_states, q_residual, position_ids, cache, layer_idx):  # a "new version" of it
        return None

    monkeypatch.setattr(compat, "_checked", set())
    monkeypatch.setattr(stock.DeepseekV4CSACompressor, "forward", forward)
    with pytest.raises(compat.UpstreamCompatError, match=r"DeepseekV4CSACompressor\.forward changed \(source sha256"):
        enable_sparse_attention(_model(TYPES, torch.float32))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(model, length: int) -> int:
    inputs = _inputs(length, left_pad=3, vocab=64)
    inputs.pop("labels")
    with _LargestTensor() as mode:
        model(**inputs).last_hidden_state.float().pow(2).mean().backward()
    return mode.largest


@pytest.mark.parametrize("layer_type", TYPES)
def test_the_largest_tensor_grows_linearly_with_the_sequence(layer_type):
    """Forward + backward of the decoder stack at 512 and 1024 tokens: the largest tensor any op makes (mask,
    scores, indexer scores, gradients) doubles with sparse attention and quadruples with stock."""
    stock, sparse = (m.model for m in _pair([layer_type], torch.float32, 64, vocab_size=64))
    sizes = {name: [_largest_tensor(m, n) for n in (512, 1024)] for name, m in (("stock", stock), ("sparse", sparse))}
    assert sizes["sparse"][1] <= 2 * sizes["sparse"][0], sizes
    assert sizes["stock"][1] >= 3.5 * sizes["stock"][0], sizes
    assert sizes["sparse"][1] * 4 < sizes["stock"][1], sizes


def test_sparse_mask_blocks_are_the_dense_mask():
    """`SparseMask.block` of any block (keys before 0 and past the end included) is that block of the dense mask."""
    model = enable_sparse_attention(_model(TYPES, torch.float32))
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("mask", kwargs["attention_mask"])

    model.model.layers[0].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in _inputs(30).items() if k != "labels"})
    mask = seen["mask"]
    assert isinstance(mask, sparse_module.SparseMask) and mask.sparse_ok
    dense = mask.dense(torch.float32) == 0
    assert dense.shape == (2, 1, 30, 30)
    for q0, q1, k0, n in [(0, 5, -7, 12), (25, 30, 20, 17), (10, 11, 0, 30)]:
        block = mask.block(q0, q1, k0, n)
        padded = torch.zeros(2, 1, 30, n + 30, dtype=torch.bool)
        lo = max(k0, 0)
        padded[..., lo - k0 : min(k0 + n, 30) - k0] = dense[..., lo : min(k0 + n, 30)]
        assert torch.equal(block, padded[:, :, q0:q1, :n]), (q0, q1, k0, n)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_under_fsdp2_with_lora_the_logits_and_gradients_are_stocks(tiny_ckpt, tmp_path):
    """2 gloo ranks, FSDP2, fp32, LoRA on every target: each rank's padded batch of 45 tokens; logits and every LoRA
    gradient (reduced over ranks) as close to transformers' attention in float64 as its float32 is (`numerics`); with activation checkpointing (decoder
    layers recomputed, attention chunks recomputed inside them) the same numbers bit for bit."""
    from dist_launch import run_ranks

    for result in run_ranks("sparse_attention", tmp_path, str(tiny_ckpt), timeout=280):
        assert result.pop("checkpointed_equal") is True
        for case, got in result.items():
            assert got["same_grads"] and got["grads"] > 40, case
            assert not got["logits_not_as_accurate"] and got["grads_not_as_accurate"] == [], (case, got)


def _flex_pair(dtype, device):
    stock = _model(TYPES, dtype).to(device)
    portable = enable_sparse_attention(copy.deepcopy(stock), chunk_size=5)
    flex = enable_sparse_attention(copy.deepcopy(stock), chunk_size=5, kernel="flex")
    return stock, portable, flex


def test_the_flex_kernel_computes_the_same_forward_on_cpu():
    """`kernel="flex"`: flex_attention with a block mask over [window keys | compressed entries] and the sinks
    applied from its log-sum-exp. torch has no flex backward on CPU, so here: the forward without gradients."""
    stock, portable, flex = _flex_pair(torch.float32, "cpu")
    inputs = {k: v for k, v in _inputs(45).items() if k != "labels"}
    with torch.no_grad():
        want, got, got_flex = (m(**inputs).logits for m in (stock, portable, flex))
    assert _rel(got_flex, got) < 1e-5 and _rel(got_flex, want) < 1e-5
    with pytest.raises(SparseAttentionError, match=r"kernel must be one of \('portable', 'flex'\), got 'triton'"):
        enable_sparse_attention(stock, kernel="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's fused kernel and its backward need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_flex_kernel_on_gpu_matches_the_portable_path(dtype):
    stock, portable, flex = _flex_pair(dtype, "cuda")
    inputs = {k: v.cuda() for k, v in _inputs(45).items()}
    (want, want_grads), (got, grads) = _step(portable, inputs), _step(flex, inputs)
    bound = 1e-5 if dtype == torch.float32 else 2**-6
    assert _rel(got, want) < bound
    assert sorted(grads) == sorted(want_grads)
    noisy = {"model.layers.0.mlp.gate.weight", *(f"model.hc_head.hc_{p}" for p in ("fn", "base", "scale"))}
    assert max(_rel(grads[n], want_grads[n]) for n in grads if n not in noisy) < (
        1e-4 if dtype == torch.float32 else 0.1
    )
