"""A training script as users write it, run by `accelerate launch` in `test_accelerate_plugin.py`.

    accelerate launch --config_file accelerate_configs/fsdp2_cpu_2proc.yaml tests/accelerate_script.py \
        {stock,dsv4} <ckpt> <out>

`stock`: what a plain `Accelerator` makes of the launch (hf_dsv4 imported, not used). `dsv4`: `DSV4Accelerator`,
`memory_efficient_init` loading, `prepare(model, optimizer)`, one SGD step. Each rank writes `<out>/<scenario>.rank<r>.json`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import accelerate.accelerator
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from dist_worker import batch, compare_to_reference, full
from numerics import FACTOR, FLOOR_ULPS, ulps_off
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import hf_dsv4.training.accelerate_plugin
from hf_dsv4 import DSV4Accelerator, memory_efficient_init
from hf_dsv4.sharding import decoder_layers

LR = 0.5


def stock(ckpt: str) -> dict:
    """A plain Accelerator under the same launch: its state, and whether `prepare` shards anything."""
    accelerator = Accelerator()
    model = torch.nn.Linear(4, 4)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    out = {
        "distributed_type": str(accelerator.distributed_type),
        "is_fsdp2": accelerator.is_fsdp2,
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "model_class": type(model).__name__,
        "sharded": any(isinstance(p, DTensor) for p in model.parameters()),
    }
    return out


def reference_step(ckpt: str, world: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Single-process parameters after one SGD step on the mean loss of every rank's batch, the model in `dtype`
    (float64: the oracle, with the eager experts loop: grouped_mm has no float64)."""
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).train()
    if dtype == torch.float64:
        ref.set_experts_implementation("eager")
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    for rank in range(world):
        (ref(batch(10 + rank), labels=batch(10 + rank)).loss / world).backward()
    optimizer.step()
    return {name: param.detach() for name, param in ref.named_parameters()}


def dsv4(ckpt: str) -> dict:
    accelerator = DSV4Accelerator()
    rank = accelerator.process_index
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    all_meta = all(p.is_meta for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    stock_prepare = mock.patch.object(
        accelerate.accelerator, "fsdp2_prepare_model", wraps=accelerate.accelerator.fsdp2_prepare_model
    )
    ours = mock.patch.object(
        hf_dsv4.training.accelerate_plugin, "shard_model", wraps=hf_dsv4.training.accelerate_plugin.shard_model
    )
    with stock_prepare as stock_spy, ours as shard_spy:
        model, optimizer = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    opt_params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {
        "distributed_type": str(accelerator.distributed_type),
        "is_fsdp2": accelerator.is_fsdp2,
        "plugin": type(accelerator.state.fsdp_plugin).__name__,
        "backend": dist.get_backend(),
        "num_processes": accelerator.num_processes,
        "all_meta_before": all_meta,
        "stock_prepare_calls": stock_spy.call_count,
        "shard_model_calls": shard_spy.call_count,
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "layers": [type(layer).__name__ for layer in decoder_layers(model)],
        "layers_sharded": all(isinstance(layer, FSDPModule) for layer in decoder_layers(model)),
        "root_sharded": isinstance(model, FSDPModule),
        "optimizer_is_model": len(opt_params) == len(params) and all(a is b for a, b in zip(opt_params, params)),
        **compare_to_reference(model, AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)),
    }
    model.train()
    before = {n: full(p).clone() for n, p in model.named_parameters()}
    loss = model(batch(10 + rank), labels=batch(10 + rank)).loss
    accelerator.backward(loss)
    optimizer.step()
    ref, truth = (reference_step(ckpt, accelerator.num_processes, dtype) for dtype in (torch.float32, torch.float64))
    # the parameters after the step as close to the float64 step's as one float32 process's are (numerics)
    out["step_not_as_accurate"] = [
        n for n, p in model.named_parameters()
        if ulps_off(full(p), truth[n]) > FACTOR * ulps_off(ref[n], truth[n]) + FLOOR_ULPS
    ]  # fmt: skip
    out["step_changed"] = sum(not torch.equal(full(p), before[n]) for n, p in model.named_parameters())
    out["partial_state_during"] = str(PartialState().distributed_type)
    accelerator.end_training()  # what `Trainer.end()` calls: accelerate's process-wide state is put back
    out["partial_state_after"] = str(PartialState().distributed_type)
    return out


def main() -> None:
    scenario, ckpt, out_dir = sys.argv[1:]
    result = globals()[scenario](ckpt)
    Path(out_dir, f"{scenario}.rank{os.environ['RANK']}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
