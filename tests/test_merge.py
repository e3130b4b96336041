"""`merge_adapter` / `python -m hf_dsv4.merge`: a LoRA adapter merged into its base one decoder layer at a time, from a
base in every checkpoint layout (`layout_ckpt`: DeepSeek's native and release FP8 / FP4, transformers'
save_pretrained, a cache snapshot, our own merge): the merged checkpoint is what peft's `merge_and_unload` gives, bit
for bit, and computes the logits of base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_as_accurate_as_stock, in_float64
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_dsv4 import merge_adapter
from hf_dsv4.training.lora import dsv4_lora_config


def _adapter(base, folder, targets: str = "all"):
    """A LoRA adapter of `targets` over `base` with random non-zero B, saved as peft saves it."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def test_the_merged_checkpoint_is_pefts_merge_and_computes_base_plus_adapter(layout_ckpt, tmp_path):
    """Into a base in every layout (transformers' own save_pretrained and our own merge included). The logits: as
    close to base + adapter computed in float64 as peft's unmerged float32 forward is (`numerics`)."""
    base = layout_ckpt
    adapter = _adapter(base, tmp_path / "adapter")
    out = merge_adapter(base, adapter, tmp_path / "merged", dtype=torch.float32)

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, expected = merged(ids).logits, reference(ids).logits
        truth = in_float64(reference)(ids).logits  # the oracle of the tolerance below
    assert_as_accurate_as_stock(got, expected, truth, "logits")
    unmerged = reference.merge_and_unload().state_dict()
    state = merged.state_dict()
    assert sorted(state) == sorted(unmerged)
    assert [k for k in state if not torch.equal(state[k], unmerged[k])] == []

    index = json.loads((out / "model.safetensors.index.json").read_text())
    layers = merged.config.num_hidden_layers
    assert len(set(index["weight_map"].values())) == layers + 1  # one file per decoder layer, one for the rest
    assert any(".experts.0." in k for k in index["weight_map"])  # saved as save_pretrained names them
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert AutoTokenizer.from_pretrained(out).chat_template  # the DeepSeek-V4 template, with generation markers


def test_merge_refuses_an_adapter_of_another_model(tiny_ckpt, release_ckpt, tmp_path):
    adapter = _adapter(tiny_ckpt, tmp_path / "adapter", targets="attention")
    with pytest.raises(
        ValueError, match=r"layers.0.self_attn.kv_proj.lora_A.weight' is \(4, 64\) but this base needs \(4, 256\)"
    ):
        merge_adapter(release_ckpt, adapter, tmp_path / "merged", dtype=torch.float32)


def test_a_failed_merge_closes_the_base_checkpoint(tiny_ckpt, release_ckpt, tmp_path, monkeypatch):
    """The base's open file handles are released whatever fails in the merge (here: an adapter of another model)."""
    from hf_dsv4.loading import stream

    opened, real = [], stream.StreamedCheckpoint.close
    monkeypatch.setattr(stream.StreamedCheckpoint, "close", lambda self: opened.append(self) or real(self))
    adapter = _adapter(tiny_ckpt, tmp_path / "adapter", targets="attention")
    with pytest.raises(ValueError, match="the adapter was trained on another model"):
        merge_adapter(release_ckpt, adapter, tmp_path / "merged", dtype=torch.float32)
    assert len(opened) == 1
