"""The tiny Hub-layout checkpoint and `memory_efficient_init`: in-process, and on 2 real gloo ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_launch import run_ranks
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM, PreTrainedModel

from hf_dsv4 import memory_efficient_init
from hf_dsv4.loading import build_on_meta, resolve_dtype
from hf_dsv4.testing.model import to_hub_state_dict


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


def hub_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint files, under its on-disk name."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def tables(model: torch.nn.Module) -> dict[str, tuple]:
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: (tuple(t.shape), t.dtype) for n, t in named}


# ------------------------------------------------------------------------------------------ the tiny checkpoint


def test_tiny_checkpoint_uses_hub_names_split_experts_and_an_index(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert names == set(hub_tensors(ckpt))
    assert len(set(index["weight_map"].values())) > 1  # sharded
    for expected in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid",
                     "layers.0.ffn.experts.3.w1.weight", "layers.0.ffn.experts.3.w2.weight",
                     "layers.1.ffn.gate.bias", "layers.1.attn.indexer.compressor.wkv.weight",
                     "layers.1.attn.indexer.weights_proj.weight", "layers.2.attn.compressor.ape",
                     "layers.0.attn.attn_sink", "layers.0.hc_attn_fn", "layers.0.attn_norm.weight"):  # fmt: skip
        assert expected in names
    assert not [n for n in names if n.startswith("model.") or "gate_up_proj" in n or "self_attn" in n]
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "config.json").exists()


def test_tiny_checkpoint_has_every_layer_type_and_router(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    assert set(config["mlp_layer_types"]) == {"hash_moe", "moe"}


def test_tiny_checkpoint_has_random_persistent_buffers(ckpt):
    tensors = hub_tensors(ckpt)
    tid2eid = tensors["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.dtype == torch.int64 and tid2eid.unique().numel() == 4
    assert (tid2eid[:, 0] != tid2eid[:, 1]).all()  # distinct experts per token
    assert tensors["layers.1.ffn.gate.bias"].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_reproduces_every_checkpoint_tensor_bit_for_bit(ckpt, dtype):
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    on_disk = hub_tensors(ckpt)
    loaded = to_hub_state_dict(model.state_dict())
    assert set(loaded) == set(on_disk)
    assert [n for n in on_disk if not torch.equal(loaded[n], on_disk[n].to(loaded[n].dtype))] == []


def test_bf16_checkpoint_keeps_fp32_modules_in_fp32(ckpt):
    tensors = hub_tensors(ckpt)
    assert tensors["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    for name in ("layers.0.hc_attn_fn", "layers.0.attn.attn_sink", "layers.2.attn.compressor.ape", "norm.weight"):
        assert tensors[name].dtype == torch.float32


# ------------------------------------------------------------------------------------------ in one process


def test_memory_efficient_init_in_one_process_is_plain_from_pretrained(ckpt):
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert type(model) is type(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(t, reference.state_dict()[n]) for n, t in model.state_dict().items())


def test_memory_efficient_init_restores_from_pretrained_on_exit_and_on_error():
    original = PreTrainedModel.__dict__["from_pretrained"]
    with memory_efficient_init():
        assert PreTrainedModel.__dict__["from_pretrained"] is not original
    assert PreTrainedModel.__dict__["from_pretrained"] is original
    with pytest.raises(KeyError), memory_efficient_init():
        raise KeyError("boom")
    assert PreTrainedModel.__dict__["from_pretrained"] is original


def test_build_on_meta_matches_from_pretrained_and_drops_load_only_kwargs(ckpt):
    for dtype in (torch.float32, torch.bfloat16):
        reference = DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=dtype)
        model = build_on_meta(DeepseekV4ForCausalLM, ckpt, dtype=dtype, device_map="cpu", low_cpu_mem_usage=True,
                              output_loading_info=True, use_safetensors=True)  # fmt: skip
        assert tables(model) == tables(reference)
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        assert not model.training and model.config.dtype == dtype


def test_build_on_meta_applies_config_overrides(ckpt):
    model = build_on_meta(DeepseekV4ForCausalLM, ckpt, dtype="auto", num_hidden_layers=2, output_router_logits=True)
    assert len(model.model.layers) == 2 and model.config.output_router_logits
    assert model.lm_head.weight.dtype == torch.bfloat16  # "auto" is the checkpoint's dtype


# ------------------------------------------------------------------------------------------ on 2 gloo ranks


@pytest.fixture(scope="module")
def load_results(ckpt, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("load")
    blind = root / "blind"  # config only; weight files are garbage: reading one would fail
    blind.mkdir()
    shutil.copy(ckpt / "config.json", blind)
    shutil.copy(ckpt / "model.safetensors.index.json", blind)
    for file in ckpt.glob("*.safetensors"):
        (blind / file.name).write_bytes(b"not a safetensors file")
    corrupt = shutil.copytree(ckpt, root / "corrupt")
    shard = sorted(corrupt.glob("*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    missing = shutil.copytree(ckpt, root / "missing")
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    file = missing / index["weight_map"].pop("layers.1.attn.compressor.ape")
    tensors = load_file(file)
    del tensors["layers.1.attn.compressor.ape"]
    save_file(tensors, file, metadata={"format": "pt"})
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    return run_ranks("load", root / "out", str(ckpt), str(blind), str(corrupt), str(missing), timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_non_source_rank_builds_meta_model_without_reading_weights(load_results):
    source, other = load_results
    assert not source["any_meta"] and other["all_meta"]
    assert other["table"] == source["table"]  # same names, shapes and dtypes (fp32-kept modules too)
    assert other["class"] == source["class"] == "DeepseekV4ForCausalLM"
    assert other["same_class_table"] and source["same_class_table"]
    assert not other["training"] and not source["training"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hook_is_scoped_on_every_rank(load_results):
    for result in load_results:
        assert result["patched"] and result["restored"] and result["restored_after_error"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corrupted_checkpoint_raises_the_same_error_on_every_rank(load_results):
    source, other = load_results
    assert source["corrupt"] == other["corrupt"]
    assert source["corrupt"].startswith("rank 0 could not load the checkpoint: SafetensorError")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_missing_checkpoint_key_raises_the_same_error_on_every_rank(load_results):
    source, other = load_results
    assert source["missing_key"] == other["missing_key"]
    assert "missing_keys: model.layers.1.self_attn.compressor.position_bias" in source["missing_key"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nested_memory_efficient_init_is_harmless_on_every_rank(load_results):
    source, other = load_results
    for result in load_results:
        assert result["nested_inner_restored"] and result["nested_restored"] and result["nested_table"]
    assert not source["nested_all_meta"] and other["nested_all_meta"]  # one load on rank 0, one meta build on rank 1


@pytest.mark.parametrize(
    ("dtype", "default", "auto", "expected"),
    [
        (None, torch.bfloat16, None, torch.bfloat16),  # the trainer's default
        ("auto", torch.bfloat16, None, "auto"),  # kept for from_pretrained to resolve (the checkpoint's dtype)
        ("auto", torch.float32, torch.bfloat16, torch.bfloat16),  # build_on_meta: the checkpoint's dtype
        (None, torch.float32, torch.bfloat16, torch.float32),
        ("float16", None, None, torch.float16),
        (torch.float64, torch.bfloat16, None, torch.float64),
    ],
)
def test_resolve_dtype_reads_a_dtype_argument_as_from_pretrained_does(dtype, default, auto, expected):
    assert resolve_dtype(dtype, default=default, auto=auto) == expected


def test_hub_kernels_are_off_under_memory_efficient_init_and_asking_for_them_is_refused():
    """transformers 5.25 kernelizes a loaded model by default; a meta model cannot be, and every rank must build the
    same modules: the rank-aware load turns them off, and an explicit `use_kernels=True` is refused, saying why."""
    from hf_dsv4.loading.stream import without_hub_kernels

    assert without_hub_kernels({"dtype": "bfloat16"}) == {"dtype": "bfloat16", "use_kernels": False}
    assert without_hub_kernels({"use_kernels": False}) == {"use_kernels": False}
    with pytest.raises(ValueError, match=r"use_kernels=True cannot be honoured under memory_efficient_init"):
        without_hub_kernels({"use_kernels": True})
