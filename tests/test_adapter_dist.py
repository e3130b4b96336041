"""Adapters on 2 real gloo ranks: only the trainable tensors cross the wire, the files equal a single process's.

Every collective that `save_adapter` / `load_adapter` dispatches is recorded (`dist_worker.CollectiveRecorder`:
DTensor's functional collectives and the `c10d` ops behind `torch.distributed`), with the elements it sends.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_launch import run_ranks
from dist_worker import DTYPES, set_lora_b
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_dsv4.sharding import align_parameter_adapter_dtypes
from hf_dsv4.training.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from hf_dsv4.training.lora import dsv4_lora_config

IDS = torch.tensor([[0, 17, 230, 5, 999, 42, 7, 64, 300, 12, 1, 3]])


pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapter_dist")


@pytest.fixture(scope="module")
def ranks(ckpt, out_dir) -> list[dict]:
    return run_ranks("adapter", out_dir, str(ckpt), str(out_dir), timeout=240)


def single_process_model(ckpt: Path, dtype: torch.dtype) -> PeftModel:
    """What `dist_worker.lora_model` builds on rank 0, in one process without torch.distributed."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    torch.manual_seed(0)
    model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets="all"))
    align_parameter_adapter_dtypes(model)
    set_lora_b(model)
    return model.eval()


@pytest.fixture(scope="module", params=list(DTYPES))
def dtype_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory, dtype_name) -> tuple[PeftModel, Path]:
    model = single_process_model(ckpt, DTYPES[dtype_name])
    folder = tmp_path_factory.mktemp(f"single_{dtype_name}")
    save_adapter(model, folder)
    return model, folder


def test_the_recorder_sees_python_level_and_dtensor_collectives(ranks):
    for result in ranks:
        seen = result["self_test"]["summary"]
        assert seen["c10d.allreduce_"]["elements"] == 3
        assert seen["c10d.broadcast_"]["calls"] == 2  # broadcast_object_list: the size, then the pickled bytes
        assert seen["_c10d_functional.all_gather_into_tensor"] == {
            "calls": 1, "elements": 12, "bytes": 48, "elements_by_dtype": {"torch.float32": 12}
        }  # fmt: skip
        assert set(seen) == {"c10d.allreduce_", "c10d.broadcast_", "_c10d_functional.all_gather_into_tensor"}
        assert result["self_test"]["full_tensor_ok"]


def test_save_all_gathers_the_trainable_shards_and_nothing_else(ranks, dtype_name, tiny_counts):
    expected = tiny_counts["lora_all"]
    for rank, result in enumerate(ranks):
        result = result[dtype_name]
        assert result["trainable_dtensors"] == result["trainable_tensors"] == expected["trainable"]
        assert set(result["save"]) == {"_c10d_functional.all_gather_into_tensor", "c10d.broadcast_"}, f"rank {rank}"
        # besides the gathers, only rank 0's write status (a pickled None: its length, then 4 bytes)
        assert result["save"]["c10d.broadcast_"] == {"calls": 2, "elements": 5, "bytes": 12,
                                                     "elements_by_dtype": {"torch.int64": 1, "torch.uint8": 4}}  # fmt: skip
        gathers = result["save"]["_c10d_functional.all_gather_into_tensor"]
        # one all-gather per trainable tensor, each sending this rank's Shard(0) chunk of it
        assert gathers["calls"] == result["trainable_tensors"]
        assert gathers["elements"] == result["trainable_padded_local_elements"] == result["trainable_local_elements"]
        assert gathers["bytes"] == result["trainable_padded_local_bytes"]
        assert gathers["elements"] * 2 == result["trainable_elements"] == expected["trainable_elements"]
        # the base model (frozen parameters and buffers; 14.7x larger on the tiny model) never crosses the wire
        assert result["frozen_elements"] == expected["frozen_elements"]
        assert result["buffer_elements"] == expected["buffer_elements"]
        per_call = [c["elements"] for c in result["save_calls"]]
        assert max(per_call) <= result["trainable_elements"] // 2
    assert ranks[0][dtype_name]["save_calls"] == ranks[1][dtype_name]["save_calls"]


def test_bf16_base_sends_the_routed_expert_adapter_in_bf16(ranks, tiny_counts):
    share = tiny_counts["lora_all"]["trainable_elements"] // 2  # this rank's half of the adapter
    gathers = ranks[0]["bfloat16"]["save"]["_c10d_functional.all_gather_into_tensor"]
    by_dtype = gathers["elements_by_dtype"]
    assert set(by_dtype) == {"torch.float32", "torch.bfloat16"} and sum(by_dtype.values()) == share
    assert gathers["bytes"] == 4 * by_dtype["torch.float32"] + 2 * by_dtype["torch.bfloat16"]
    assert ranks[0]["float32"]["save"]["_c10d_functional.all_gather_into_tensor"]["elements_by_dtype"] == {
        "torch.float32": share
    }


def test_saved_adapter_equals_a_single_process_save_bitwise(ranks, reference, out_dir, dtype_name, tiny_counts):
    folder = out_dir / f"adapter_{dtype_name}"
    assert [result[dtype_name]["returned"] for result in ranks] == [str(folder), None]  # the folder, on rank 0
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    _, single = reference
    saved, expected = load_file(folder / ADAPTER_WEIGHTS), load_file(single / ADAPTER_WEIGHTS)
    assert sorted(saved) == sorted(expected) and len(saved) == tiny_counts["lora_all"]["trainable"]
    assert [k for k in expected if saved[k].dtype != expected[k].dtype or not torch.equal(saved[k], expected[k])] == []
    assert all(saved[k].count_nonzero() for k in saved if "lora_B" in k)  # the B weights set on rank 0 arrived
    assert json.loads((folder / ADAPTER_CONFIG).read_text()) == json.loads((single / ADAPTER_CONFIG).read_text())


def test_peft_from_pretrained_loads_the_distributed_save(ckpt, reference, out_dir, dtype_name):
    model, _ = reference
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=DTYPES[dtype_name])
    loaded = PeftModel.from_pretrained(base, out_dir / f"adapter_{dtype_name}").eval()
    saved = load_file(out_dir / f"adapter_{dtype_name}" / ADAPTER_WEIGHTS)
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[k.replace(".weight", ".default.weight")], t) for k, t in saved.items())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_load_adapter_into_zeroed_shards_restores_the_file_bitwise(ranks, dtype_name, tiny_counts):
    for result in ranks:
        result = result[dtype_name]
        assert result["zeroed_nonzero"] == []  # the zeroing reached every shard
        assert result["frozen_changed_by_load"] == []
        # rank 0 broadcasts each full trainable tensor once (plus a few pickled key lists)
        broadcasts = result["load"]["c10d.broadcast_"]
        floats = {d: n for d, n in broadcasts["elements_by_dtype"].items() if "float" in d}
        assert sum(floats.values()) == result["trainable_elements"]
        assert set(result["load"]) == {"c10d.broadcast_"}
    assert ranks[0][dtype_name]["reload_keys_equal"]
    assert ranks[0][dtype_name]["reload_tensors"] == tiny_counts["lora_all"]["trainable"]
    assert ranks[0][dtype_name]["reload_not_equal"] == []


def test_a_missing_adapter_raises_the_same_error_on_both_ranks(ranks, out_dir, dtype_name):
    first, second = (result[dtype_name]["missing"] for result in ranks)
    missing = out_dir / "no_such_adapter"
    expected = f"FileNotFoundError: No such file or directory: {missing / ADAPTER_WEIGHTS}"
    assert first == second == expected  # the original exception type on both ranks, not a wrapper
    assert ranks[0][dtype_name]["missing_note"] is None  # rank 0 raises its own exception object
    assert (
        ranks[1][dtype_name]["missing_note"] == "raised on rank 0, re-raised on rank 1 by hf_dsv4; rank 0's traceback:"
    )


def test_a_failed_write_on_rank_0_raises_on_every_rank(ranks):
    on_rank_0, on_rank_1 = (result["save_error"] for result in ranks)
    assert on_rank_0 is not None and on_rank_0.startswith("FileExistsError: ")
    assert on_rank_1 == on_rank_0  # the same error on the rank that did not write
