"""`export_adapter(..., format="vllm" | "vllm-3d")`: a trained adapter under DeepSeek-native names with the routed
experts split per expert, or kept fused where vLLM's 3-D format reads them. Each exported pair's `B @ A * scaling` must equal, bit for bit, the slice of peft's own delta for the
module the checkpoint name maps to — mapped back with transformers' forward loading rules, the direction the export
does not use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from hf_dsv4.export import export_adapter
from hf_dsv4.training.lora import dsv4_lora_config

MAPPING = get_checkpoint_conversion_mapping("deepseek_v4")
RENAMINGS = [m for m in MAPPING if isinstance(m, WeightRenaming)]
CONVERTERS = [m for m in MAPPING if isinstance(m, WeightConverter)]


def _adapter(ckpt, preset: str, folder, **lora_kwargs):
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    peft_model = get_peft_model(model, dsv4_lora_config(r=2, alpha=6, targets=preset, **lora_kwargs))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: give every delta a value
                param.copy_(torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return peft_model


def _hf_delta(peft_model, hf_name: str) -> torch.Tensor:
    """peft's own delta for the model tensor `hf_name` (a LoRA linear's weight, or a fused expert parameter)."""
    from peft.tuners.lora.layer import LoraLayer

    module_name, _, leaf = hf_name.rpartition(".")
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name.replace(".base_layer", "") == module_name and getattr(module, "parameter_name", "weight") == leaf:
            return module.get_delta_weight("default")
    raise KeyError(hf_name)


@pytest.mark.parametrize("preset", ["attention", "attention+shared", "all"])
def test_every_exported_pair_is_the_slice_of_peft_delta_its_checkpoint_name_maps_to(tiny_ckpt_fp32, tmp_path, preset):
    peft_model = _adapter(tiny_ckpt_fp32, preset, tmp_path / "adapter")
    out = export_adapter(tmp_path / "adapter", tmp_path / "vllm")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    state = peft_model.base_model.model.state_dict()  # the base model's names (peft's wrappers left out)
    meta = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    modules = sorted({key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in tensors})
    seen_hf = set()
    for native in modules:
        a = tensors[f"base_model.model.{native}.lora_A.weight"]
        b = tensors[f"base_model.model.{native}.lora_B.weight"]
        hf_name, _ = rename_source_key(f"{native}.weight", RENAMINGS, CONVERTERS, "model", meta)
        assert hf_name in meta, (native, hf_name)
        delta = _hf_delta(peft_model, hf_name)
        if native.split(".")[-2].isdigit():  # layers.N.ffn.experts.E.wK: a slice of the fused expert delta
            e, which = int(native.split(".")[-2]), native.split(".")[-1]
            half = delta.shape[1] // 2
            expected = {"w1": delta[e][:half], "w3": delta[e][half:], "w2": delta[e]}[which]
        else:
            expected = delta
        assert torch.equal(b @ a * scaling, expected), native
        seen_hf.add(hf_name)
    adapted = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}  # one per adapted tensor
    assert len(seen_hf) == len(adapted)  # every adapted module and fused expert parameter was exported
    assert config["target_parameters"] is None
    expected_leaves = {"attention": ["wkv", "wo_b", "wq_a", "wq_b"]}.get(preset)
    if expected_leaves:
        assert config["target_modules"] == expected_leaves
    if preset == "all":
        assert {"w1", "w2", "w3"} <= set(config["target_modules"])
        layer0 = [m for m in modules if m.startswith("layers.0.ffn.experts.")]
        assert len(layer0) == 3 * peft_model.base_model.model.config.n_routed_experts


ROUTED = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize(
    "parameters", [ROUTED, ROUTED[::-1], ROUTED[:1], ROUTED[1:]], ids=["both", "down-outer", "gate_up", "down"]
)
def test_vllm_3d_keeps_the_experts_fused_where_vllm_reads_them(tiny_ckpt_fp32, tmp_path, parameters):
    """gate_up under `experts.base_layer`, down under `experts`, whatever order peft wrapped them in; each expert's
        `B_e @ A_e * scaling` (vLLM's split: A expert-major, B rank-major) is peft's delta for that expert bit for bit; an
        unadapted one of the pair is zeros of its shape, and format="vllm" writes it as zero factors for every expert (vLLM's
    per-expert packer asserts w1, w2 and w3); everything else is what format="vllm" writes. format="vllm" of
        the same adapter splits each expert the same way (peft nests the wrappers in the module's parameter order, not
        in target_parameters' order: "down-outer" lists down_proj first)."""
    peft_model = _adapter(tiny_ckpt_fp32, "attention", tmp_path / "adapter", target_parameters=parameters)
    flat = load_file(str(export_adapter(tmp_path / "adapter", tmp_path / "vllm") / "adapter_model.safetensors"))
    out = export_adapter(tmp_path / "adapter", tmp_path / "vllm3d", format="vllm-3d")
    fused = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    r, scaling = config["r"], config["lora_alpha"] / config["r"]
    outside = {k for k in flat if ".ffn.experts." not in k}
    assert outside == {k for k in fused if ".ffn.experts." not in k}
    assert all(torch.equal(flat[k], fused[k]) for k in outside)
    hf_config = peft_model.base_model.model.config
    experts, layers = hf_config.n_routed_experts, hf_config.num_hidden_layers
    expected_keys = {f"base_model.model.layers.{n}.ffn.experts.{pos}lora_{f}.weight"
                     for n in range(layers) for pos in ("base_layer.", "") for f in "AB"}  # fmt: skip
    assert {k for k in fused if ".ffn.experts." in k} == expected_keys
    for n in range(layers):
        for kind, position in (("gate_up_proj", "base_layer."), ("down_proj", "")):
            a = fused[f"base_model.model.layers.{n}.ffn.experts.{position}lora_A.weight"]
            b = fused[f"base_model.model.layers.{n}.ffn.experts.{position}lora_B.weight"]
            per_a, per_b = a.view(experts, r, a.shape[1]), b.view(b.shape[0], r, experts).permute(2, 0, 1)
            delta = per_b @ per_a * scaling  # [E, out, in]
            if f"mlp.experts.{kind}" in parameters:
                expected = _hf_delta(peft_model, f"model.layers.{n}.mlp.experts.{kind}")
                assert torch.equal(delta, expected), (n, kind)
                half = expected.shape[1] // 2  # format="vllm" of the same adapter: per expert, gate the first half
                for e in range(experts):
                    slices = {"w1": expected[e][:half], "w3": expected[e][half:]} if kind == "gate_up_proj" else {
                        "w2": expected[e]}  # fmt: skip
                    for which, want in slices.items():
                        native = f"base_model.model.layers.{n}.ffn.experts.{e}.{which}"
                        got = flat[f"{native}.lora_B.weight"] @ flat[f"{native}.lora_A.weight"] * scaling
                        assert torch.equal(got, want), (n, e, which)
            else:
                assert not a.any() and not b.any(), (n, kind)
                for e in range(experts):  # format="vllm": every expert has w1, w2 and w3 (vLLM asserts it), zero
                    for which in ("w1", "w3") if kind == "gate_up_proj" else ("w2",):
                        native = f"base_model.model.layers.{n}.ffn.experts.{e}.{which}"
                        factors = flat[f"{native}.lora_A.weight"], flat[f"{native}.lora_B.weight"]
                        assert not any(f.any() for f in factors), (n, e, which)
                        assert factors[0].shape[0] == factors[1].shape[1] == r, (n, e, which)
                hidden, inter = hf_config.hidden_size, hf_config.moe_intermediate_size
                shape = (experts, 2 * inter, hidden) if kind == "gate_up_proj" else (experts, hidden, inter)
                assert delta.shape == shape, (n, kind)
    assert config["target_parameters"] is None
    assert config["target_modules"] == ["experts", "wkv", "wo_b", "wq_a", "wq_b"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_command_line_exports_and_refuses_an_unknown_format(tiny_ckpt_fp32, tmp_path):
    _adapter(tiny_ckpt_fp32, "attention", tmp_path / "adapter")
    done = subprocess.run(
        [sys.executable, "-m", "hf_dsv4.export", str(tmp_path / "adapter"), str(tmp_path / "vllm")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == str(tmp_path / "vllm")
    assert (tmp_path / "vllm" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="format must be one of"):
        export_adapter(tmp_path / "adapter", tmp_path / "x", format="vllm-4d")
