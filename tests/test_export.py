"""`hf_dsv4.save_pretrained_sharded`: a sharded model written as a Hub checkpoint, rank by rank, that equals what
`save_pretrained` writes from the whole model; on 2 real gloo ranks with every collective recorded, and in one
process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_launch import run_ranks
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from hf_dsv4 import compat, save_pretrained_sharded


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_same_checkpoint(folder: Path, reference: Path) -> None:
    """Same tensors (names, dtypes, bits) and the same config as `reference`, and an index that maps every tensor."""
    saved, expected = _tensors(folder), _tensors(reference)
    assert sorted(saved) == sorted(expected)
    for name, tensor in expected.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    assert json.loads((folder / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(saved)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    for file in set(index["weight_map"].values()):
        with safe_open(folder / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {k for k, v in index["weight_map"].items() if v == file} == set(f.keys())


def _assert_reloads(folder: Path, dtype: torch.dtype) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory) -> Path:
    """`save_pretrained` of the whole tiny bf16 model in this process."""
    folder = tmp_path_factory.mktemp("save_pretrained")
    AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def test_one_process_writes_what_save_pretrained_writes(tiny_ckpt, reference, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    (tmp_path / "model-00099-of-00099.safetensors").write_text("a stale file from an earlier export")
    assert save_pretrained_sharded(model, tmp_path) == tmp_path
    layers = model.config.num_hidden_layers
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(1, layers + 2)
    ]  # one file for the rest, then one per decoder layer; the stale file is gone
    _assert_same_checkpoint(tmp_path, reference)
    # file k holds decoder layer k-2 only
    assert set(load_file(tmp_path / f"model-00002-of-{layers + 1:05d}.safetensors")) == {
        k for k in _tensors(reference) if k.startswith("model.layers.0.")
    }
    _assert_reloads(tmp_path, torch.bfloat16)


def test_the_reverse_weight_conversion_gives_the_names_save_pretrained_writes(tiny_ckpt, reference):
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    layer = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.1.")}
    reverted = compat.revert_weight_conversion(model, layer)
    written = {k: v for k, v in _tensors(reference).items() if k.startswith("model.layers.1.")}
    assert set(reverted) == set(written) != set(layer)  # the fused experts are split per expert again
    assert any(".experts.0.w1." in k for k in reverted)
    assert all(torch.equal(reverted[k], written[k]) for k in written)


def test_a_model_under_an_adapter_is_refused(tiny_ckpt, tmp_path):
    from peft import get_peft_model

    from hf_dsv4.training.lora import dsv4_lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_ckpt), dsv4_lora_config(r=2, targets="all"))
    with pytest.raises(ValueError, match="holds a PEFT adapter"):
        save_pretrained_sharded(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def ranks(tiny_ckpt, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("export_dist")
    return run_ranks("export", out, str(tiny_ckpt), str(out), timeout=240), out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_write_what_save_pretrained_writes_sending_each_shard_once(ranks, reference, single_thread):
    results, out = ranks
    folder = out / "export"
    assert [r["returned"] for r in results] == [str(folder), None]
    _assert_same_checkpoint(folder, reference)
    _assert_reloads(folder, torch.bfloat16)
    for rank, result in enumerate(results):
        save = result["save"]
        gathers = save["_c10d_functional.all_gather_into_tensor"]
        # one all-gather per sharded tensor, each sending this rank's chunk once; no tensor larger than the largest
        assert gathers["calls"] == result["sharded_tensors"], rank
        assert gathers["elements"] == result["padded_local_elements"], rank
        assert set(gathers["elements_by_dtype"]) == {"torch.bfloat16", "torch.float32"}  # fp32-kept modules
        assert result["largest_call"] <= result["largest_tensor"] // 2
        # besides the gathers: the files each rank wrote, and the write status, as pickled objects
        assert all(
            not any("float" in d for d in by_dtype)
            for op, entry in save.items()
            if op != "_c10d_functional.all_gather_into_tensor"
            for by_dtype in [entry["elements_by_dtype"]]
        )
        assert result["peft_refused"].startswith("ValueError: save_pretrained_sharded writes a full model")
