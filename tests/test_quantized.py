"""A quantized-resident frozen base (`memory_efficient_init(stream=True, keep_quantized=True)`): the release checkpoint's
FP8 / FP4 weights read as stored, the model given their quantized form, each weight dequantized per module with
transformers' arithmetic (and again in backward), LoRA on top; under FSDP2 on 2 gloo ranks logits and every LoRA
gradient equal those over the dequantized base bit for bit."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from dist_launch import run_ranks
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from hf_dsv4 import DSV4SFTConfig, DSV4SFTTrainer, memory_efficient_init
from hf_dsv4.loading.stream import stream_source
from hf_dsv4.sharding import QuantizationError, dequantize, quantize_base, quantized_modules
from hf_dsv4.sharding import quantized as quantized_module
from hf_dsv4.testing import release
from hf_dsv4.training.lora import dsv4_lora_config


def _release_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in index.items():
        with safe_open(str(path / file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def streamed_quantized(release_ckpt):
    """The release checkpoint opened in one process as keep_quantized does: the model on meta and its reader."""
    with memory_efficient_init(stream=True, keep_quantized=True):
        model = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=torch.bfloat16)
    reader = stream_source(model).checkpoint
    assert reader is not None and reader.keep_quantized
    return model, reader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_deepseeks_decode_for_fp8_and_fp4(release_ckpt, dtype):
    tensors = _release_tensors(release_ckpt)
    checked = {"fp8": 0, "fp4": 0}
    for name, weight in tensors.items():
        scale = tensors.get(name.removesuffix(".weight") + ".scale")
        if scale is None or not name.endswith(".weight"):
            continue
        kind = "fp4" if weight.dtype == torch.int8 else "fp8"
        reference = (release.dequantize_fp4 if kind == "fp4" else release.dequantize_fp8)(weight, scale)
        got = dequantize(weight.view(torch.uint8), scale.view(torch.uint8), kind, dtype)
        assert got.dtype == dtype and torch.equal(got.float(), reference), name
        checked[kind] += 1
    assert checked["fp8"] > 10 and checked["fp4"] > 10
    # a stack of experts is dequantized expert by expert: the same as each expert alone
    experts = [n for n in tensors if ".ffn.experts." in n and n.endswith(".w1.weight")][:3]
    codes = torch.stack([tensors[n].view(torch.uint8) for n in experts])
    scales = torch.stack([tensors[n.replace(".weight", ".scale")].view(torch.uint8) for n in experts])
    stack = dequantize(codes, scales, "fp4", dtype)
    assert all(torch.equal(stack[i], dequantize(codes[i], scales[i], "fp4", dtype)) for i in range(3))
    with pytest.raises(ValueError, match="unknown quantization kind 'int4'"):
        dequantize(codes, scales, "int4", dtype)


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_gives_transformers_bits_for_every_byte_and_every_scale(kind, dtype):
    """Every code byte under every ue8m0 exponent (255 = NaN included): the same bits as transformers' arithmetic."""
    exponents = torch.arange(256, dtype=torch.uint8)[:, None]
    if kind == "fp8":  # one exponent per 128-row block, every byte in every row
        data, scale = torch.arange(256, dtype=torch.uint8).repeat(256 * 128, 1), exponents.repeat(1, 2)
    else:  # one exponent per row, 512 values (every byte once) per row
        data, scale = torch.arange(256, dtype=torch.uint8).repeat(256, 1), exponents.repeat(1, 16)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    got, reference = (
        dequantize(data, scale, kind, dtype),
        quantized_module.dequantize_reference(data, scale, kind, dtype),
    )
    assert got.dtype == reference.dtype == dtype and torch.equal(got.view(bits), reference.view(bits))
    block = 128 if kind == "fp8" else 1  # rows per scale row
    experts = torch.stack([data[: 2 * block], data[2 * block : 4 * block]]), torch.stack([scale[:2], scale[2:4]])
    stacked = dequantize(*experts, kind, dtype)  # a stack of two experts: each as on its own
    assert torch.equal(stacked.flatten(0, 1).view(bits), reference[: 4 * block].view(bits))


def test_the_reader_reads_quantized_weights_as_stored(streamed_quantized, release_ckpt):
    model, reader = streamed_quantized
    plan = reader.quantized_plan()
    reference = release.release_reference_state_dict(release_ckpt)
    meta = model.state_dict()
    fp8 = "model.layers.0.self_attn.q_a_proj.weight"
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    config = model.config
    assert plan[fp8] == ("fp8", (config.q_lora_rank, config.hidden_size), (1, 2))
    n, inter, hidden = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    assert plan[experts] == ("fp4", (n, 2 * inter, hidden // 2), (n, 2 * inter, hidden // 32))
    assert {kind for kind, _, _ in plan.values()} == {"fp8", "fp4"}
    assert all(".mtp" not in t and "embed" not in t and "norm" not in t for t in plan)
    unit = reader.read("model.layers.1.")
    for target in plan:
        if not target.startswith("model.layers.1."):
            continue
        short = target[len("model.layers.1.") :]
        assert short not in unit  # no dequantized copy
        data, scale = unit[short + "_q"], unit[short + "_scale"]
        assert data.dtype == scale.dtype == torch.uint8 and tuple(data.shape) == plan[target][1]
        decoded = dequantize(data, scale, plan[target][0], torch.float32)
        assert torch.equal(decoded, reference[target]), target
    # the tensors the checkpoint keeps unquantized are converted as before (bf16 here)
    assert torch.equal(unit["mlp.gate.weight"].float(), reference["model.layers.1.mlp.gate.weight"])
    assert {k for k in unit if not k.endswith(("_q", "_scale"))} == {
        k[len("model.layers.1.") :] for k in meta if k.startswith("model.layers.1.") and k not in plan
    }
    # rows (FSDP2's dim 0) of codes, scales and experts: exactly those rows of the whole read
    rows = {f"{experts}_q": (1, 3), f"{experts}_scale": (2, 4), f"{fp8.replace('layers.0', 'layers.1')}_q": (5, 70)}
    part = reader.read("model.layers.1.", rows, set(rows))
    assert set(part) == {k[len("model.layers.1.") :] for k in rows}
    for key, (start, stop) in rows.items():
        short = key[len("model.layers.1.") :]
        assert torch.equal(part[short], unit[short][start:stop]), key
    assert (
        reader.read("model.layers.1.", {f"{experts}_q": (2, 2)}, {f"{experts}_q"})["mlp.experts.gate_up_proj_q"].shape[
            0
        ]
        == 0
    )


def _meta_peft_model(model, targets="all"):
    from peft import get_peft_model

    return get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets=targets))


def test_quantize_base_gives_the_model_its_quantized_form(release_ckpt, streamed_quantized):
    with memory_efficient_init(stream=True, keep_quantized=True):
        model = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=torch.bfloat16)
    plan = stream_source(model).checkpoint.quantized_plan()
    peft_model = _meta_peft_model(model)
    from hf_dsv4.sharding.streamed import reader_names

    before = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if ".lora_" in n}
    assert quantize_base(peft_model, plan, reader_names(peft_model)) == len(plan)
    assert quantize_base(peft_model, plan, reader_names(peft_model)) == 0  # idempotent
    assert {n: tuple(p.shape) for n, p in peft_model.named_parameters() if ".lora_" in n} == before
    modules = quantized_modules(peft_model)
    layer = "base_model.model.model.layers.1."
    q_a = modules[layer + "self_attn.q_a_proj.base_layer"]
    assert type(q_a) is nn.Linear and type(modules[layer + "self_attn.o_a_proj"]).__name__ == "DeepseekV4GroupedLinear"
    weight = q_a.weight  # the quantized weight: its bytes, with the shape and dtype of the weight it stands for
    assert isinstance(weight, quantized_module.QuantizedWeight) and not weight.requires_grad
    assert weight.codes.dtype == weight.scale.dtype == torch.uint8 and weight.codes.shape == (128, 256)
    assert weight.shape == (model.config.q_lora_rank, model.config.hidden_size)
    assert weight.dtype == torch.bfloat16 and weight.is_meta
    assert sorted(q_a.state_dict()) == ["weight_q", "weight_scale"]  # the checkpoint's parts, as the loaders fill them
    experts = modules[layer + "mlp.experts.base_layer.base_layer"]
    assert sorted(quantized_module.quantized_weights(experts)) == ["down_proj", "gate_up_proj"]
    wrapper = peft_model.get_submodule(layer + "mlp.experts.base_layer")
    assert type(wrapper).__name__ == "ParamWrapper" and wrapper.parameter_name == "gate_up_proj"  # peft's own
    stand_in = wrapper.get_param()  # the quantized weight itself: nothing dequantized to read its shape
    assert stand_in is experts.gate_up_proj and isinstance(stand_in, quantized_module.QuantizedWeight)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".lora_" not in n)
    with pytest.raises(QuantizationError, match="cannot be merged into a quantized-resident base"):
        peft_model.merge_and_unload()  # would add the update to a dequantized copy and lose it


def test_keep_quantized_refuses_a_trainable_base_and_what_it_cannot_keep(release_ckpt, tiny_ckpt, tmp_path):
    with memory_efficient_init(stream=True, keep_quantized=True):
        model = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=torch.bfloat16)
    plan = stream_source(model).checkpoint.quantized_plan()
    with pytest.raises(QuantizationError, match=r"'model.layers.0.[a-z_.]+' is trainable, but keep_quantized keeps"):
        quantize_base(model, plan)  # full fine-tuning: every base parameter trainable
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(QuantizationError, match=r"1 other parameter\(s\) are trainable \(lm_head.weight\)"):
        quantize_base(model, plan)
    with pytest.raises(QuantizationError, match="no parameter 'model.layers.9.mlp.experts.down_proj'"):
        quantize_base(model, {"model.layers.9.mlp.experts.down_proj": ("fp4", (1,), (1,))})
    with pytest.raises(ValueError, match="keep_quantized applies to a streamed checkpoint"):
        with memory_efficient_init(keep_quantized=True):
            pass
    with pytest.raises(Exception, match="holds no quantized \\(FP8 / FP4\\) weights"):
        with memory_efficient_init(stream=True, keep_quantized=True):
            AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    args = DSV4SFTConfig(str(tmp_path / "out"), keep_quantized=True, use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match="keep_quantized keeps the base frozen and trains LoRA adapters only"):
        DSV4SFTTrainer(str(release_ckpt), args=args)


def _quantized_linear(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A module holding one quantized Linear (FP8 codes + scales from the release encoder), and its weight."""
    gen = torch.Generator().manual_seed(seed)
    codes, scale = release.encode_fp8("w", torch.Size([256, 256]), gen)
    holder = nn.Module()
    with torch.device("meta"):
        holder.proj = nn.Linear(256, 256, bias=False)
    holder.proj.weight.requires_grad_(False)
    quantize_base(holder, {"proj.weight": ("fp8", (256, 256), (2, 2))})
    holder.load_state_dict({"proj.weight_q": codes.view(torch.uint8), "proj.weight_scale": scale.view(torch.uint8)},
                           assign=True)  # fmt: skip
    return holder, release.dequantize_fp8(codes, scale)


@pytest.mark.parametrize("recompute", [True, False])
def test_a_quantized_module_dequantizes_once_per_forward_and_again_in_backward(monkeypatch, recompute):
    holder, weight = _quantized_linear()
    holder.proj.recompute_in_backward = recompute
    calls = []
    real = quantized_module.dequantize
    monkeypatch.setattr(quantized_module, "dequantize", lambda *a: calls.append(a[2]) or real(*a))
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = holder.proj(x)
    assert len(calls) == 1  # forward: once
    (y * torch.arange(256.0)).sum().backward()
    assert len(calls) == (2 if recompute else 1)  # backward: made again from the bytes instead of kept
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, weight)
    (y_ref * torch.arange(256.0)).sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    with torch.no_grad():  # outside a forward the property gives the weight it stands for
        assert torch.equal(holder.proj.weight, weight)


def _quantized_experts(experts: str, implementation: str):
    """Quantized routed experts of the tiny release config (FP4 from the release encoder) and the stock module over the
    same weights dequantized, both with transformers' experts `implementation`."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    config = release.release_dsv4_config()
    config._experts_implementation = implementation
    gen = torch.Generator().manual_seed(1)
    n, inter, hidden = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    parts = {"gate_up_proj": [release.encode_fp4("w", torch.Size([2 * inter, hidden]), gen) for _ in range(n)],
             "down_proj": [release.encode_fp4("w", torch.Size([hidden, inter]), gen) for _ in range(n)]}  # fmt: skip
    holder = nn.Module()
    with torch.device("meta"):
        holder.experts = DeepseekV4Experts(config)
    holder.requires_grad_(False)
    plan = {
        f"experts.{leaf}": ("fp4", (n, *codes[0][0].shape), (n, *codes[0][1].shape)) for leaf, codes in parts.items()
    }
    quantize_base(holder, plan, experts=experts)
    state, stock = {}, DeepseekV4Experts(config).requires_grad_(False)
    for leaf, codes in parts.items():
        state[f"experts.{leaf}_q"] = torch.stack([c.view(torch.uint8) for c, _ in codes])
        state[f"experts.{leaf}_scale"] = torch.stack([s.view(torch.uint8) for _, s in codes])
        getattr(stock, leaf).copy_(torch.stack([release.dequantize_fp4(c, s) for c, s in codes]))
    holder.load_state_dict(state, assign=True)
    return holder.experts, stock, config


@pytest.mark.parametrize("recompute", [True, False])
def test_a_quantized_module_inside_an_activation_checkpoint_gives_the_same_gradients(recompute):
    holder, weight = _quantized_linear(seed=3)
    holder.proj.recompute_in_backward = recompute  # on: its recipes nest inside the checkpoint's own hooks
    x = torch.randn(2, 7, 256, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: holder.proj(t).sin(), x, use_reentrant=False)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x_ref, weight).sin().sum().backward()
    assert torch.equal(y, nn.functional.linear(x_ref.detach(), weight).sin()) and torch.equal(x.grad, x_ref.grad)


def test_a_quantized_module_hands_what_it_does_not_keep_to_the_saved_tensor_hooks_outside():
    """Inside activation checkpointing the checkpoint's hooks must still see (and drop) the module's activations,
    while of the weights autograd saves the quantized weight (its bytes, `QuantizedWeight`), never a dequantized one
    (before the subclass: hooks pushed inside replaced the outer ones, which then saw nothing, and the layer's
    activations were kept)."""
    quantized, _, config = _quantized_experts("per_expert", "eager")
    weight_shapes = {tuple(quantized.gate_up_proj.shape[1:]), tuple(quantized.down_proj.shape[1:])}
    seen = []
    x = torch.randn(6, config.hidden_size, requires_grad=True)
    index = torch.arange(12).view(6, 2) % config.n_routed_experts
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        quantized(x, index, torch.rand(6, 2))
    dense = {tuple(t.shape) for t in seen if not isinstance(t, quantized_module.QuantizedWeight)}
    weights = [t for t in seen if isinstance(t, quantized_module.QuantizedWeight)]
    assert dense and not weight_shapes & dense, (dense, weight_shapes)
    assert weights and all(w.codes.dtype == torch.uint8 and w.codes.dim() == 2 for w in weights)  # one expert's bytes


def test_per_expert_experts_inside_an_activation_checkpoint_keep_one_experts_weights_at_a_time(monkeypatch):
    """Hazard 8: the recomputed layer's backward made each expert's weights again, one expert at a time, instead of
    keeping every hit expert's (Flash: 256 x 50 MB in bf16 per layer)."""
    import weakref

    quantized, stock, config = _quantized_experts("per_expert", "eager")
    alive, most = weakref.WeakSet(), [0]
    real = quantized_module.dequantize

    def tracked(*args):
        weight = real(*args)
        alive.add(weight)
        most[0] = max(most[0], len(alive))
        return weight

    monkeypatch.setattr(quantized_module, "dequantize", tracked)
    tokens = 16
    x = torch.randn(tokens, config.hidden_size, requires_grad=True)
    index = torch.randint(0, config.n_routed_experts, (tokens, config.num_experts_per_tok),
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
    weights = torch.rand(tokens, config.num_experts_per_tok)
    out = torch.utils.checkpoint.checkpoint(quantized, x, index, weights, use_reentrant=False)
    most[0] = 0
    out.square().sum().backward()
    assert len(index.unique()) >= 4 and most[0] <= 2  # one expert's gate_up and down weights, never more
    x_ref = x.detach().clone().requires_grad_(True)
    stock(x_ref, index, weights).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("experts,implementation", [("per_expert", "eager"), ("stack", "grouped_mm")])
def test_quantized_experts_compute_as_the_stock_implementation_one_expert_or_one_stack_at_a_time(
    monkeypatch, experts, implementation
):
    quantized, stock, config = _quantized_experts(experts, implementation)
    calls = []
    real = quantized_module.dequantize
    monkeypatch.setattr(quantized_module, "dequantize", lambda *a: calls.append(a[0].dim()) or real(*a))
    tokens = 12
    x = torch.randn(tokens, config.hidden_size, requires_grad=True)
    index = torch.randint(0, config.n_routed_experts, (tokens, config.num_experts_per_tok),
                          generator=torch.Generator().manual_seed(2))  # fmt: skip
    weights = torch.rand(tokens, config.num_experts_per_tok)
    out = quantized(x, index, weights)
    hit = len(index.unique())
    # per expert: each hit expert's two weights, one at a time; stack: each weight of the layer once
    assert calls == ([2] * 2 * hit if experts == "per_expert" else [3, 3])
    forward = list(calls)
    out.square().sum().backward()
    assert calls == forward + forward  # backward made each weight again from the bytes
    x_ref = x.detach().clone().requires_grad_(True)
    ref = stock(x_ref, index, weights)
    ref.square().sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quantized_base_equals_the_dequantized_one_under_fsdp2(release_ckpt, tmp_path):
    """2 gloo ranks, a streamed release checkpoint with a seeded LoRA adapter (B non-zero): quantized-resident vs
    dequantized, logits and every LoRA gradient, fp32 and bf16, with and without routed-expert adapters; experts per
    expert (vs transformers' eager experts over the dequantized base) and as one stack (vs its default, grouped_mm).

    Bit for bit, except the routed-expert factors' gradients computed per expert: peft folds the update into the
    whole stack with one batched `baddbmm`, whose backward is one batched `bmm` over all experts; per expert it is one
    `bmm` per expert, which rounds differently (measured: 2.7e-7 relative in fp32, 5.1e-4 in bf16, under one bf16
    ulp). Logits stay bitwise (the forward folds are the same numbers)."""
    results = run_ranks("quantized", tmp_path, str(release_ckpt), timeout=540)
    for result in results:
        # every rank reading its own rows in 64 KB pieces: the same model as rank 0 reading whole layers
        assert result.pop("readers_all_in_pieces") == {"logits_equal": True, "grads_equal": True}
        # activation checkpointing: the same numbers; the quantized modules still save recipes, not weights
        assert result.pop("activation_checkpointing") == {"logits_equal": True, "grads_equal": True,
                                                          "recompute_flags": [True]}  # fmt: skip
        # its adapter, gathered and put on the dequantized base by peft in one process: the same logits
        on_dequantized = result.pop("adapter_on_dequantized_base")
        assert on_dequantized["logits_equal"] and not on_dequantized["unexpected"] and on_dequantized["tensors"] > 20
        assert sorted(result) == ["bfloat16/all/per_expert", "bfloat16/all/stack", "float32/all/per_expert",
                                  "float32/attention+shared/per_expert"]  # fmt: skip
        for case, got in result.items():
            assert got["logits_equal"], case
            assert got["same_grads"] and got["grads"] > 20, (case, got)
            assert all(".mlp.experts." in name for name in got["not_equal"]), case
            if "per_expert" not in case or "/all/" not in case:
                assert got["grads_equal"] == got["grads"], case
            bound = 1e-6 if case.startswith("float32") else 2**-8
            assert got["grads_max_relative"] <= bound, (case, got["grads_max_relative"])
            quantized, dequantized = got["bytes"]
            assert dequantized["quantized"] == 0 and quantized["quantized"] > 0, case
    bf16 = results[0]["bfloat16/all/stack"]["bytes"]
    # the FP8 / FP4 bytes + scales of this rank's shards vs the same weights in bf16
    assert bf16[0]["all"] < 0.6 * bf16[1]["all"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quantized_base_sharded_unevenly_over_three_ranks_equals_the_dequantized_one(release_ckpt, tmp_path):
    """3 gloo ranks divide none of the release model's row counts: every quantized weight is padded by FSDP2 and the
    last rank holds fewer rows, or none (an FP8 weight's 2 rows of scale blocks, 4 experts). Logits bit for bit and
    LoRA gradients as on 2 ranks (bitwise except the routed-expert factors per expert: batched vs per-expert bmm)."""
    results = run_ranks("quantized_uneven", tmp_path, str(release_ckpt), world_size=3, timeout=540)
    rows = [result.pop("local_rows") for result in results]
    assert sorted(rows[0]) == sorted(rows[1]) == sorted(rows[2]) and len(rows[0]) > 10
    uneven = [name for name in rows[0] if len({rows[0][name], rows[1][name], rows[2][name]}) > 1]
    empty = [name for name in rows[0] if rows[2][name] == 0]
    assert uneven and empty, (uneven, empty)  # the case this test exists for happened
    for result in results:
        assert sorted(result) == ["bfloat16/all/stack", "float32/all/per_expert"]
        for case, got in result.items():
            assert got["logits_equal"], case
            assert got["same_grads"] and got["grads"] > 20, (case, got)
            assert all(".mlp.experts." in name for name in got["not_equal"]), case
            if "per_expert" not in case:
                assert got["grads_equal"] == got["grads"], case
            bound = 1e-6 if case.startswith("float32") else 2**-8
            assert got["grads_max_relative"] <= bound, (case, got["grads_max_relative"])


REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_recipe_trains_lora_over_the_quantized_base_like_over_the_dequantized_one(release_ckpt, tmp_path):
    """`accelerate launch recipes/sft_dsv4.py --keep_quantized true` on 2 CPU ranks (fp32, routed experts adapted) vs
    the same run over the dequantized base: with `--quantized_experts stack` the same loss at every step and the same
    adapter files, bit for bit; with the default (per expert) the same losses within rounding; the adapter loads with
    `PeftModel.from_pretrained` on the dequantized base."""
    from dist_launch import AccelerateRun
    from peft import PeftModel
    from safetensors.torch import load_file

    args = ["--model_name_or_path", str(release_ckpt), "--dataset_name", str(REPO / "recipes/data/dsv4_demo.jsonl"),
            "--dtype", "float32", "--max_length", "192", "--max_steps", "3", "--logging_steps", "1",
            "--per_device_train_batch_size", "1", "--learning_rate", "0.01", "--lora_target_modules", "all",
            "--report_to", "none", "--seed", "7", "--save_strategy", "no"]  # fmt: skip
    variants = {"stack": ["--keep_quantized", "true", "--quantized_experts", "stack"],
                "per_expert": ["--keep_quantized", "true"], "dequantized": []}  # fmt: skip
    runs = {
        name: AccelerateRun(name, CPU_2PROC, str(REPO / "tests/recipe_script.py"),
                            [*args, *extra, "--output_dir", str(tmp_path / name)], tmp_path)
        for name, extra in variants.items()
    }  # fmt: skip
    losses = {}
    for name, run in runs.items():
        if run.wait(800) != 0 or not (tmp_path / name / "test_result.json").is_file():
            raise run.failure("no result")
        history = json.loads((tmp_path / name / "test_result.json").read_text())["log_history"]
        losses[name] = [(e["step"], e["loss"]) for e in history if "loss" in e]
    assert "weight(s) kept quantized (FP8 / FP4 as stored), experts stack" in (tmp_path / "stack.log").read_text()
    assert "experts per_expert" in (tmp_path / "per_expert.log").read_text()
    assert len(losses["stack"]) == 3 and losses["stack"] == losses["dequantized"]
    assert [s for s, _ in losses["per_expert"]] == [1, 2, 3]
    assert all(abs(a - b) <= 1e-4 * abs(b) for (_, a), (_, b) in zip(losses["per_expert"], losses["dequantized"]))
    adapters = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in runs}
    assert sorted(adapters["stack"]) == sorted(adapters["dequantized"]) and any(
        "experts" in k for k in adapters["stack"]
    )
    assert all(torch.equal(adapters["stack"][k], adapters["dequantized"][k]) for k in adapters["stack"])
    configs = {name: json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in runs}
    assert configs["stack"] == configs["per_expert"] == configs["dequantized"]

    base = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=torch.float32)  # dequantized by transformers
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "per_expert")(ids).logits
    assert not torch.equal(plain, tuned) and bool(torch.isfinite(tuned).all())


def test_per_expert_quantized_experts_run_transformers_eager_loop_whatever_the_models_implementation(monkeypatch):
    """experts="per_expert" computes expert by expert also when the model's experts implementation is grouped_mm
    (`compat.eager_experts_config`: the module's own config), and the model's config is left as it was."""
    quantized, stock, config = _quantized_experts("per_expert", "grouped_mm")
    assert quantized.config._experts_implementation == "eager" and config._experts_implementation == "grouped_mm"
    calls = []
    real = quantized_module.dequantize
    monkeypatch.setattr(quantized_module, "dequantize", lambda *a: calls.append(a[0].dim()) or real(*a))
    x = torch.randn(10, config.hidden_size)
    index = torch.randint(0, config.n_routed_experts, (10, config.num_experts_per_tok),
                          generator=torch.Generator().manual_seed(4))  # fmt: skip
    weights = torch.rand(10, config.num_experts_per_tok)
    out = quantized(x, index, weights)
    assert calls == [2] * 2 * len(index.unique())
    stock.config = quantized.config  # the stock module with transformers' eager loop over the dequantized stack
    assert torch.equal(out, stock(x, index, weights))


def _quantized_weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 weight [256, 256] (bf16) and an FP4 stack of 4 experts [64, 128] (fp32) from the release encoder."""
    gen = torch.Generator().manual_seed(seed)
    codes, scale = release.encode_fp8("w", torch.Size([256, 256]), gen)
    fp8 = quantized_module.QuantizedWeight(codes.view(torch.uint8), scale.view(torch.uint8), "fp8", (256, 256),
                                           torch.bfloat16)  # fmt: skip
    stack = [release.encode_fp4("w", torch.Size([64, 128]), gen) for _ in range(4)]
    fp4 = quantized_module.QuantizedWeight(torch.stack([c.view(torch.uint8) for c, _ in stack]),
                                           torch.stack([s.view(torch.uint8) for _, s in stack]), "fp4", (4, 64, 128),
                                           torch.float32)  # fmt: skip
    return fp8, fp4


def test_a_quantized_weight_shards_and_gathers_as_its_bytes():
    """What FSDP2 does to a parameter (`torch.chunk` along dim 0, a zero-padded copy, the all-gather extension) keeps
    the bytes: an FP8 weight's codes split by rows and its 128-row block scales kept whole by every shard, an FP4
    expert stack's codes and scales split by experts; the gathered weight dequantizes to the whole one. In-place
    changes are refused (peft's merge)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    fp8, fp4 = _quantized_weights(6)
    for weight, whole_scale in ((fp8, True), (fp4, False)):
        assert is_traceable_wrapper_subclass(weight)  # torch's memory tracker counts its codes' and scales' bytes
        shards = torch.chunk(weight, 2, dim=0)
        assert [type(s) for s in shards] == [quantized_module.QuantizedWeight] * 2
        for i, shard in enumerate(shards):
            rows = slice(i * weight.shape[0] // 2, (i + 1) * weight.shape[0] // 2)
            assert shard.shape == (weight.shape[0] // 2, *weight.shape[1:]) and shard.dtype == weight.dtype
            assert torch.equal(shard.codes, weight.codes[rows])
            assert torch.equal(shard.scale, weight.scale if whole_scale else weight.scale[rows])
        padded = shards[1].new_zeros(shards[1].shape)
        padded.narrow(0, 0, shards[1].shape[0]).copy_(shards[1])
        assert torch.equal(padded.codes, shards[1].codes) and torch.equal(padded.scale, shards[1].scale)
        with _fake_mesh(2) as mesh:
            inputs = [shard.fsdp_pre_all_gather(mesh, weight.shape, weight.stride(), None, None) for shard in shards]
        assert all(t.dtype == torch.uint8 for sent, _ in inputs for t in sent)  # bytes travel, never the weight
        gathered = [torch.cat([sent[k] for sent, _ in inputs]) for k in range(len(inputs[0][0]))]
        full, buffers = shards[0].fsdp_post_all_gather(gathered, inputs[0][1], weight.dtype)
        assert full.shape == weight.shape and all(b.dtype == torch.uint8 for b in buffers)
        dense = dequantize(weight.codes, weight.scale, weight.kind, weight.dtype)
        assert torch.equal(full.dequantized(), dense) and torch.equal(full[1], dense[1])
        if whole_scale:  # an FP8 shard's rows are not whole scale blocks
            with pytest.raises(QuantizationError, match="a shard of a quantized weight is dequantized whole"):
                shards[0].dequantized()
        else:  # an expert stack's shard holds whole experts
            assert torch.equal(shards[1].dequantized(), dense[2:])
        with pytest.raises(QuantizationError, match="cannot be merged into a quantized-resident base"):
            full.add_(1.0)
    state = nn.Linear(256, 256, bias=False)
    state.weight = nn.Parameter(fp8, requires_grad=False)
    with pytest.raises(QuantizationError, match="cannot be merged into a quantized-resident base"):
        state.weight.data += torch.ones(256, 256, dtype=torch.bfloat16)


def test_a_quantized_weight_sharded_unevenly_gathers_its_bytes_in_the_padded_shape():
    """FSDP2 pads an uneven dim 0 and wants an extension's all-gather inputs in the padded shard's shape: an FP8
    weight's codes have it, an FP4 stack's codes and row scales are laid into it (17/32 of its bytes); the gathered
    weight is the whole one. 3 ranks (a real device mesh over torch's fake process group), the all-gather by hand."""
    fp8, fp4 = _quantized_weights(8)
    with _fake_mesh(3) as mesh:
        for weight in (fp8, fp4):
            rows = -(-weight.shape[0] // 3)
            chunks = list(torch.chunk(weight, 3, dim=0))
            chunks += [weight.new_empty((0, *weight.shape[1:]))] * (3 - len(chunks))  # as FSDP2 pads the list
            inputs = []
            for chunk in chunks:  # FSDP2's padded shard, narrowed to the rank's rows
                padded = chunk.new_zeros((rows, *weight.shape[1:]))
                shard = padded.narrow(0, 0, chunk.shape[0])
                shard.copy_(chunk)
                sent, metadata = shard.fsdp_pre_all_gather(mesh, weight.shape, weight.stride(), None, None)
                assert [(t.shape, t.dtype) for t in sent] == [((rows, *weight.shape[1:]), torch.uint8)]
                inputs.append((sent, metadata))
            gathered = [torch.cat([sent[0] for sent, _ in inputs])]
            full, buffers = chunks[0].fsdp_post_all_gather(gathered, inputs[0][1], weight.dtype)
            assert full.shape == weight.shape and all(b.dtype == torch.uint8 for b in buffers)
            dense = dequantize(weight.codes, weight.scale, weight.kind, weight.dtype)
            assert torch.equal(full.dequantized(), dense)
            again = gathered[0].clone()  # FSDP2 refills the same buffers and hands the weight back (`out`)
            gathered[0].zero_()
            for buffer in buffers[1:]:
                buffer.zero_()
            gathered[0].copy_(again)
            assert chunks[0].fsdp_post_all_gather(gathered, inputs[0][1], weight.dtype, out=full) is None
            assert torch.equal(full.dequantized(), dense)


@contextlib.contextmanager
def _fake_mesh(ranks: int):
    """A device mesh of `ranks` CPU ranks over torch's fake process group (this process is rank 0)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hf_dsv4 import compat

    dist.init_process_group("fake", store=compat.fake_store(), rank=0, world_size=ranks)
    try:
        yield init_device_mesh("cpu", (ranks,))
    finally:
        dist.destroy_process_group()
