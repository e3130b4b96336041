"""The tiny release-layout checkpoint (`build_release_dsv4`): it is encoded like deepseek-ai/DeepSeek-V4-Flash, and
stock `AutoModelForCausalLM.from_pretrained` on CPU dequantizes it to exactly what DeepSeek's decode gives."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from hf_dsv4.testing import build_release_dsv4, release_reference_state_dict
from hf_dsv4.testing.release import dequantize_fp4, dequantize_fp8

# Small shards, so that some FP8 weights and their `.scale` land in different files.
SHARD_BYTES = 40_000

FP8_WEIGHT = re.compile(
    r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.attn\.indexer\.wq_b\.weight$|\.shared_experts\.w[123]\.weight$"
    r"|^mtp\.0\.[eh]_proj\.weight$"
)
FP4_WEIGHT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FP32 = re.compile(r"(attn_sink|\.ape|\.gate\.bias|hc_(attn|ffn|head)_(fn|base|scale))$")


def release_dtype(name: str) -> torch.dtype:
    """The dtype deepseek-ai/DeepSeek-V4-Flash stores the tensor `name` in."""
    if name.endswith(".scale"):
        return torch.float8_e8m0fnu
    if FP8_WEIGHT.search(name):
        return torch.float8_e4m3fn
    if FP4_WEIGHT.search(name):
        return torch.int8
    if FP32.search(name):
        return torch.float32
    if name.endswith(".tid2eid"):
        return torch.int64
    return torch.bfloat16


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory):
    return build_release_dsv4(tmp_path_factory.mktemp("release_dsv4"), max_shard_bytes=SHARD_BYTES)


@pytest.fixture(scope="module")
def reference(release_ckpt):
    return release_reference_state_dict(release_ckpt)


def read_checkpoint(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for filename in sorted(set(weight_map.values())):
        with safe_open(str(path / filename), framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return weight_map, tensors


def test_release_checkpoint_is_sharded_with_release_dtypes_scales_and_mtp(release_ckpt):
    weight_map, tensors = read_checkpoint(release_ckpt)
    assert set(weight_map) == set(tensors)
    assert len(set(weight_map.values())) > 3
    assert any(weight_map[n] != weight_map[n.removesuffix(".scale") + ".weight"] for n in tensors if ".scale" in n)

    assert {name: t.dtype for name, t in tensors.items()} == {name: release_dtype(name) for name in tensors}
    for name in (n for n in tensors if n.endswith(".scale")):
        weight = tensors[name.removesuffix(".scale") + ".weight"]
        rows, cols = weight.shape
        if weight.dtype == torch.int8:  # FP4: two codes per byte, 1x32 blocks
            assert tensors[name].shape == (rows, 2 * cols // 32), name
        else:  # FP8: 128x128 blocks
            assert tensors[name].shape == (rows // 128, cols // 128), name
    quantized = {n for n in tensors if FP8_WEIGHT.search(n) or FP4_WEIGHT.search(n)}
    assert {n.removesuffix(".weight") + ".scale" for n in quantized} == {n for n in tensors if n.endswith(".scale")}

    # One layer of each attention type; the hash layer routes by `tid2eid` and has no `gate.bias`.
    assert tensors["layers.1.attn.compressor.ape"].shape == (4, 2 * 128)  # compressed sparse, overlapping
    assert tensors["layers.2.attn.compressor.ape"].shape == (128, 128)  # heavily compressed
    assert not any(n.startswith("layers.0.attn.compressor") for n in tensors)
    assert tensors["layers.0.ffn.gate.tid2eid"].shape == (1024, 2)
    assert "layers.0.ffn.gate.bias" not in tensors and "layers.1.ffn.gate.tid2eid" not in tensors
    assert tensors["layers.1.ffn.experts.3.w2.weight"].shape == (256, 64)

    mtp = {n for n in tensors if n.startswith("mtp.0.")}
    assert {"mtp.0.e_proj.weight", "mtp.0.e_proj.scale", "mtp.0.enorm.weight", "mtp.0.hc_head_fn"} <= mtp
    assert {"mtp.0.attn.wq_a.weight", "mtp.0.ffn.experts.0.w1.weight", "mtp.0.ffn.gate.bias"} <= mtp


def test_release_config_json_uses_release_fields_that_transformers_folds(release_ckpt):
    raw = json.loads((release_ckpt / "config.json").read_text())
    assert raw["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    assert (raw["expert_dtype"], raw["compress_ratios"], raw["num_hash_layers"]) == ("fp4", [0, 4, 128, 0], 1)
    assert raw["num_nextn_predict_layers"] == 1 and "layer_types" not in raw

    config = AutoConfig.from_pretrained(release_ckpt)
    assert config.layer_types == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    assert config.mlp_layer_types == ["hash_moe", "moe", "moe"]
    assert config.quantization_config["expert_dtype"] == "fp4"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stock_from_pretrained_dequantizes_the_release_layout_exactly(release_ckpt, reference, dtype):
    model, info = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=dtype, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert type(model.model.layers[1].self_attn.q_a_proj) is torch.nn.Linear  # dequantized, no FP8Linear on CPU

    state = model.state_dict()
    assert set(state) == set(reference)
    # torch.equal compares values, so transformers' -0.0 for FP4 code 8 equals DeepSeek's +0.0
    different = [name for name, ref in reference.items() if not torch.equal(state[name].to(ref.dtype), ref)]
    assert different == []
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype, torch.float32}
    assert state["model.layers.1.mlp.experts.gate_up_proj"].dtype == dtype

    experts = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.signbit(experts[experts == 0]).any()  # the -0.0 is real: a bitwise comparison would fail
    assert not torch.signbit(reference["model.layers.1.mlp.experts.gate_up_proj"]).logical_and(experts == 0).any()

    with torch.no_grad():
        logits = model(torch.arange(3, 40).unsqueeze(0)).logits
    assert logits.shape == (1, 37, 1024) and torch.isfinite(logits).all()


def test_april_flash_config_without_expert_dtype_loads_the_same_on_cpu(release_ckpt, reference, tmp_path):
    shutil.copytree(release_ckpt, tmp_path, dirs_exist_ok=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["expert_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(raw))

    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    state = model.state_dict()
    assert [name for name, ref in reference.items() if not torch.equal(state[name].float(), ref.float())] == []


def test_reference_decoder_follows_deepseek_conventions():
    # FP4: low nibble first; code 8 is +0.0; one 2^(s-127) per 32 columns.
    packed = torch.tensor([[0x21, 0xF8] + [0] * 30], dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[126, 129]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    decoded = dequantize_fp4(packed, scale)
    assert decoded[0, :4].tolist() == [0.25, 0.5, 0.0, -3.0] and not torch.signbit(decoded[0, 2])
    assert torch.equal(decoded[0, 32:], torch.zeros(32))
    # FP8: one 2^(s-127) per 128x128 block.
    weight = torch.full((256, 128), 1.5).to(torch.float8_e4m3fn)
    scale = torch.tensor([[127], [125]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    decoded = dequantize_fp8(weight, scale)
    assert torch.equal(decoded[:128], torch.full((128, 128), 1.5))
    assert torch.equal(decoded[128:], torch.full((128, 128), 0.375))


def test_build_is_deterministic_and_deeper_models_repeat_the_schedule(release_ckpt, tmp_path):
    again = build_release_dsv4(tmp_path / "again", max_shard_bytes=SHARD_BYTES)
    for path in release_ckpt.glob("*.safetensors"):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name

    deeper = build_release_dsv4(tmp_path / "deeper", seed=1, num_hidden_layers=4)
    assert json.loads((deeper / "config.json").read_text())["compress_ratios"] == [0, 4, 128, 0, 0]
    ref, other = release_reference_state_dict(deeper), release_reference_state_dict(release_ckpt)
    assert "model.layers.3.self_attn.q_a_proj.weight" in ref
    assert not torch.equal(ref["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_dims_that_are_not_whole_quantization_blocks_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"attn\.wq_a\.weight \(128, 192\) is not a multiple of the 128x128"):
        build_release_dsv4(tmp_path, hidden_size=192)
    with pytest.raises(ValueError, match="compress rates 4 and 128"):
        build_release_dsv4(
            tmp_path, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}
        )
