"""`DSV4Accelerator` + `DSV4FSDP2Plugin` under `accelerate launch` with the 2-process CPU config (real processes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dist_launch import AccelerateRun

from hf_dsv4 import DSV4FSDP2Plugin

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml"
SCRIPT = Path(__file__).with_name("accelerate_script.py")
# (scenario, extra environment): the YAML alone, and the YAML with ACCELERATE_USE_CPU=true
RUNS = {"stock": ("stock", {}), "stock_use_cpu": ("stock", {"ACCELERATE_USE_CPU": "true"}), "dsv4": ("dsv4", {})}


def launch_all(ckpt: Path, out: Path, timeout: float = 150) -> dict[str, list[dict]]:
    """`accelerate launch --config_file CONFIG tests/accelerate_script.py <scenario> ...` for every run in RUNS, at
    the same time; each run's per-rank results. A run that fails or outlives `timeout` fails with its output."""
    runs = []
    for name, (scenario, extra) in RUNS.items():
        (out / name).mkdir(parents=True)
        runs.append(AccelerateRun(name, ["--config_file", str(CONFIG)], str(SCRIPT), [scenario, str(ckpt), str(out / name)], out, extra))  # fmt: skip
    results = {}
    for run in runs:
        status = run.wait(timeout)
        files = sorted((out / run.name).glob("*.json"))
        if status != 0 or len(files) != 2:
            raise run.failure(f"{len(files)} rank results")
        results[run.name] = [json.loads(f.read_text()) for f in files]
    return results


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tmp_path_factory) -> dict[str, list[dict]]:
    return launch_all(tiny_ckpt, tmp_path_factory.mktemp("accelerate"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stock_accelerator_ignores_fsdp_on_cpu_processes(runs):
    # the YAML alone: two processes that each think they are alone
    for result in runs["stock"]:
        assert result == {"distributed_type": "DistributedType.NO", "is_fsdp2": False, "num_processes": 1,
                          "process_index": 0, "model_class": "Linear", "sharded": False}  # fmt: skip
    # with ACCELERATE_USE_CPU=true: one gloo group, but DDP instead of FSDP
    for rank, result in enumerate(runs["stock_use_cpu"]):
        assert result == {"distributed_type": "DistributedType.MULTI_CPU", "is_fsdp2": False, "num_processes": 2,
                          "process_index": rank, "model_class": "DistributedDataParallel", "sharded": False}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepare_shards_every_decoder_layer_with_fsdp2_on_cpu_processes(runs, tiny_counts):
    for result in runs["dsv4"]:
        assert result["distributed_type"] == "DistributedType.FSDP" and result["is_fsdp2"]
        assert result["plugin"] == "DSV4FSDP2Plugin"
        assert result["backend"] == "gloo" and result["num_processes"] == 2
        assert result["all_dtensor"] and result["root_sharded"] and result["layers_sharded"]
        assert result["layers"] == tiny_counts["layers"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_end_training_puts_back_accelerates_process_state(runs):
    for result in runs["dsv4"]:
        assert result["partial_state_during"] == "DistributedType.FSDP"
        assert result["partial_state_after"] == "DistributedType.MULTI_CPU"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepare_uses_shard_model_not_accelerates_loader(runs):
    for result in runs["dsv4"]:
        assert result["shard_model_calls"] == 1 and result["stock_prepare_calls"] == 0
    assert runs["dsv4"][1]["all_meta_before"] and not runs["dsv4"][0]["all_meta_before"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepared_model_equals_single_process_model_bit_for_bit(runs, tiny_counts):
    for result in runs["dsv4"]:
        assert result["bad_params"] == [] and result["bad_buffers"] == []
        assert result["num_tensors"] == tiny_counts["tensors"]
        assert result["logits_equal"], result["logits_max_diff"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_optimizer_steps_the_sharded_parameters_on_every_rank(runs, tiny_counts):
    for result in runs["dsv4"]:
        assert result["optimizer_is_model"]
        assert result["step_changed"] == tiny_counts["with_grad"]  # every parameter with a gradient
        assert result["step_not_as_accurate"] == []  # = one single-process SGD step on the mean loss (numerics)


def test_plugin_reads_accelerate_launch_environment(monkeypatch):
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    plugin = DSV4FSDP2Plugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FSDP_VERSION": "1"}, "hf_dsv4 shards with FSDP2 only, got fsdp_version=1"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "call `model.gradient_checkpointing_enable()`"),
    ],
)
def test_plugin_rejects_what_it_cannot_do(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        DSV4FSDP2Plugin()


def test_accelerates_bf16_policy_reduces_gradients_in_fp32_and_leaves_outputs_uncast():
    """accelerate turns `mixed_precision: bf16` into param and reduce dtype bf16 for every group (1.15: output too); the sharded
    model gets fp32 gradient reduction and uncast outputs (what the launch configs promise); a policy chosen with
    another reduction dtype is kept as it is."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from hf_dsv4.training.accelerate_plugin import fp32_reduction

    plugin = DSV4FSDP2Plugin()
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # output dtype: bf16 in 1.15, None in 1.16
    policy = fp32_reduction(plugin.mixed_precision_policy)
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    chosen = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float16)
    assert fp32_reduction(chosen) is chosen and fp32_reduction(None) is None
