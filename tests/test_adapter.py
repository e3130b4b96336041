"""Adapter save/load in one process: PEFT-identical files, atomic saves, exact round trips (distributed: test_fsdp)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from safetensors.torch import save_file as real_save_file
from torch import nn

import hf_dsv4.training.adapter
from hf_dsv4.testing import tiny_dsv4_config
from hf_dsv4.training.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, gather_adapter, load_adapter, save_adapter
from hf_dsv4.training.lora import dsv4_lora_config

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[0, 17, 230, 5, 999, 42, 7, 64, 300, 12, 1, 3]])


def base_model() -> transformers.DeepseekV4ForCausalLM:
    torch.manual_seed(0)  # the same base weights on every call
    return transformers.DeepseekV4ForCausalLM(tiny_dsv4_config()).eval()


def peft_model(seed: int) -> PeftModel:
    """The tiny model with the "all" preset (Linear and routed-expert LoRA) and random, non-zero LoRA B weights."""
    model = peft.get_peft_model(base_model(), dsv4_lora_config(r=2, targets="all"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {
        name: (folder / name).read_bytes() for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if (folder / name).exists()
    }


def staging_folders(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".adapter-")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, folder written by save_adapter, folder written by PeftModel.save_pretrained)."""
    root = tmp_path_factory.mktemp("adapters")
    model = peft_model(seed=1)
    assert save_adapter(model, root / "ours") == root / "ours"
    model.save_pretrained(root / "peft")
    return model, root / "ours", root / "peft"


def test_save_writes_exactly_the_two_peft_files(saved):
    _, ours, _ = saved
    assert sorted(p.name for p in ours.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_saved_tensors_are_those_of_save_pretrained_bitwise(saved):
    model, ours, theirs = saved
    mine, reference = load_file(ours / ADAPTER_WEIGHTS), load_file(theirs / ADAPTER_WEIGHTS)
    assert set(mine) == set(reference)
    assert any(".mlp.experts." in key for key in mine) and any(".self_attn.q_a_proj." in key for key in mine)
    n_lora = sum(1 for name, p in model.named_parameters() if p.requires_grad)
    assert len(mine) == n_lora
    for key, tensor in reference.items():
        assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), key


def test_saved_config_is_that_of_save_pretrained(saved):
    _, ours, theirs = saved
    mine = json.loads((ours / ADAPTER_CONFIG).read_text())
    assert mine == json.loads((theirs / ADAPTER_CONFIG).read_text())
    assert mine["inference_mode"] is True
    assert mine["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_from_pretrained_reproduces_the_logits_bitwise(saved):
    model, ours, _ = saved
    reference = logits(model)
    assert not torch.equal(reference, logits(base_model()))  # the adapter changes the output
    loaded = PeftModel.from_pretrained(base_model(), ours).eval()
    assert torch.equal(logits(loaded), reference)


def test_gather_adapter_returns_the_saved_tensors_also_through_a_wrapper(saved):
    model, ours, _ = saved
    stored = load_file(ours / ADAPTER_WEIGHTS)
    for holder in (model, nn.ModuleDict({"wrapped": model})):
        gathered = gather_adapter(holder)
        assert set(gathered) == set(stored)
        assert all(torch.equal(gathered[key], stored[key]) for key in stored)


def test_load_adapter_restores_the_saved_values_bitwise(saved):
    model, ours, _ = saved
    other = peft_model(seed=2)
    expected = dict(model.named_parameters())
    trainable = [name for name, p in other.named_parameters() if p.requires_grad]
    assert not torch.equal(dict(other.named_parameters())[trainable[1]], expected[trainable[1]])
    load_adapter(other, ours)
    for name in trainable:
        assert torch.equal(dict(other.named_parameters())[name], expected[name]), name
    assert torch.equal(logits(other), logits(model))


def test_load_adapter_with_a_missing_tensor_raises_naming_the_file(saved, tmp_path):
    model, ours, _ = saved
    stored = load_file(ours / ADAPTER_WEIGHTS)
    dropped = sorted(stored)[0]
    del stored[dropped]
    real_save_file(stored, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError) as excinfo:  # in one process: the original exception, not a wrapper
        load_adapter(peft_model(seed=2), tmp_path)
    assert str(excinfo.value) == f"{tmp_path / ADAPTER_WEIGHTS} lacks 1 adapter tensor(s), e.g. [{dropped!r}]"


@pytest.mark.parametrize("function", [gather_adapter, save_adapter, load_adapter])
def test_a_model_without_peft_is_refused(function, tmp_path):
    args = (tmp_path,) if function is not gather_adapter else ()
    with pytest.raises(ValueError, match="^Linear holds no PeftModel: there is no adapter to save or load$"):
        function(nn.Linear(2, 2), *args)
    assert list(tmp_path.iterdir()) == []


def partial_then_fail(tensors, path, metadata=None):
    Path(path).write_bytes(b"\x00" * 64)  # a torn write
    raise OSError("disk full")


def test_interrupted_first_save_leaves_no_adapter_and_no_staging(saved, tmp_path, monkeypatch):
    model, _, _ = saved
    monkeypatch.setattr(hf_dsv4.training.adapter, "save_file", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# Where a save over a previous adapter can be interrupted: writing the weights, writing the config, or moving
# either file into place (os.replace call 1 = weights, 2 = config).
INTERRUPTIONS = ["save_file", "config", "replace_weights", "replace_config"]


@pytest.mark.parametrize("where", INTERRUPTIONS)
def test_interrupted_save_over_a_previous_adapter_never_leaves_a_config_with_other_weights(
    saved, tmp_path, monkeypatch, where
):
    """What save_adapter guarantees: at every point, `adapter_config.json` is either absent or sits beside the
    complete weights saved with it; a failure before the config is unlinked leaves the previous adapter untouched;
    the staging folder is always removed."""
    model, ours, _ = saved
    folder = tmp_path / "checkpoint"
    save_adapter(peft_model(seed=3), folder)
    previous = adapter_files(folder)
    new = adapter_files(ours)
    assert previous[ADAPTER_WEIGHTS] != new[ADAPTER_WEIGHTS]

    if where == "save_file":
        monkeypatch.setattr(hf_dsv4.training.adapter, "save_file", partial_then_fail)
    elif where == "config":
        monkeypatch.setattr(
            peft.LoraConfig, "save_pretrained", lambda self, path: partial_then_fail({}, Path(path) / ADAPTER_CONFIG)
        )
    else:
        calls, real_replace = [], os.replace

        def replace(src, dst):
            calls.append(Path(dst).name)
            if len(calls) == INTERRUPTIONS.index(where) - 1:
                raise OSError("disk full")
            real_replace(src, dst)

        monkeypatch.setattr(hf_dsv4.training.adapter.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, folder)
    monkeypatch.undo()

    after = adapter_files(folder)
    assert staging_folders(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(after)
    if where in ("save_file", "config"):
        assert after == previous  # the config was never removed: the previous adapter is intact
    elif where == "replace_weights":
        assert after == {ADAPTER_WEIGHTS: previous[ADAPTER_WEIGHTS]}  # config removed, old weights not taken
    else:
        assert after == {ADAPTER_WEIGHTS: new[ADAPTER_WEIGHTS]}  # new weights in place, config not yet


def test_a_save_over_a_previous_adapter_replaces_both_files(saved, tmp_path):
    model, ours, _ = saved
    save_adapter(peft_model(seed=3), tmp_path)
    save_adapter(model, tmp_path)
    assert adapter_files(tmp_path) == adapter_files(ours)
    assert staging_folders(tmp_path) == []
