"""Worker for the multi-process tests: one rank of a scenario, result written to `<out>/rank<r>.json`.

Run by `dist_launch.run_ranks` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set:
    python tests/dist_worker.py <scenario> <out_dir> [args...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM, PreTrainedModel

from hf_dsv4 import CheckpointLoadError, ShardingError, memory_efficient_init, shard_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def batch(seed: int, size: int = 2, length: int = 24) -> torch.Tensor:
    """Token ids (no special ids) that are the same in every process for a given seed."""
    return torch.randint(3, 600, (size, length), generator=torch.Generator().manual_seed(seed))


def table(model: torch.nn.Module) -> dict[str, list]:
    """name -> [shape, dtype] of every parameter and buffer."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: [list(t.shape), str(t.dtype)] for n, t in named}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard, or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def compare_to_reference(model: torch.nn.Module, ref: torch.nn.Module) -> dict:
    """Bit-exact comparison of parameters, buffers and logits of a sharded model and a single-process one."""
    bad_params = [n for n, p in model.named_parameters() if not torch.equal(full(p), ref.get_parameter(n))]
    bad_buffers = [n for n, b in model.named_buffers() if not torch.equal(b, ref.get_buffer(n))]
    with torch.no_grad():
        logits, ref_logits = model(batch(1)).logits, ref(batch(1)).logits
    return {
        "bad_params": bad_params,
        "bad_buffers": bad_buffers,
        "num_tensors": len(list(model.parameters())) + len(list(model.buffers())),
        "logits_equal": torch.equal(logits, ref_logits),
        "logits_max_diff": (logits.float() - ref_logits.float()).abs().max().item(),
    }


def scenario_parity(ckpt: str, blind_ckpt: str) -> dict:
    """memory_efficient_init + shard_model vs plain from_pretrained, in fp32 (Auto class) and bf16 (model class).

    Ranks other than 0 get `blind_ckpt`: the same config, but every weight file is garbage.
    """
    out = {}
    for dtype_name, cls in (("float32", AutoModelForCausalLM), ("bfloat16", DeepseekV4ForCausalLM)):
        path = ckpt if dist.get_rank() == 0 else blind_ckpt
        with memory_efficient_init():
            model = cls.from_pretrained(path, dtype=DTYPES[dtype_name])
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=DTYPES[dtype_name])
        result = {
            "all_meta": all(t.is_meta for t in [*model.parameters(), *model.buffers()]),
            "same_table": table(model) == table(ref),
            "training": model.training,
        }
        shard_model(model)
        out[dtype_name] = {**result, **compare_to_reference(model, ref)}
    # cpu_offload on a CPU-only machine
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    shard_model(model, cpu_offload=True)
    out["offload"] = compare_to_reference(model, AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16))
    out["mismatch"] = mismatch_error(ckpt)
    return out


def mismatch_error(ckpt: str) -> str | None:
    """The error shard_model raises on every rank when rank 1 built its model with twice the experts."""
    overrides = {} if dist.get_rank() == 0 else {"n_routed_experts": 8}
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, **overrides)
    try:
        shard_model(model)
    except ShardingError as exc:
        return str(exc)
    return None


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else full(p.grad) for n, p in model.named_parameters()}


def grad_parity(ckpt: str) -> dict:
    """fp32 data-parallel gradients (rank r trains on batch r) vs the single-process mean gradient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    shard_model(model)
    model.train()
    model(batch(10 + rank), labels=batch(10 + rank)).loss.backward()
    grads = _grads(model)

    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    for r in range(world):
        (ref(batch(10 + r), labels=batch(10 + r)).loss / world).backward()
    ref_grads = _grads(ref)
    none_mismatch = [n for n in grads if (grads[n] is None) != (ref_grads[n] is None)]
    diffs = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in grads if grads[n] is not None}
    close = [n for n in diffs if torch.allclose(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7)]
    return {
        "none_mismatch": none_mismatch,
        "not_close": sorted(set(diffs) - set(close)),
        "max_diff": max(diffs.values()),
        "with_grad": len(diffs),
        "without_grad": [n for n in grads if grads[n] is None],
    }


def _compute_dtypes(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, str]:
    """Record the dtype of parameter `names[i]` as its module sees it in forward (after FSDP's all-gather)."""
    seen = {}
    for name in names:
        module_name, param_name = name.rsplit(".", 1)
        module = model.get_submodule(module_name)

        def hook(module, args, name=name, param_name=param_name):
            seen[name] = str(getattr(module, param_name).dtype)

        module.register_forward_pre_hook(hook)
    return seen


def scenario_train(ckpt: str) -> dict:
    """fp32 gradient parity, a bf16 training step (all trainable), bf16 compute on fp32 weights, a LoRA step."""
    from peft import LoraConfig, get_peft_model

    out = {"grad_parity": grad_parity(ckpt)}
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    shard_model(model)
    out["bf16"] = train_step(model)

    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    watched = ("model.layers.0.attn_hc.fn", "model.layers.1.self_attn.sinks", "model.norm.weight",
               "model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.gate_up_proj")  # fmt: skip
    seen = _compute_dtypes(model, watched)
    shard_model(model, mixed_precision=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    out["mixed"] = {**train_step(model), "compute_dtypes": dict(seen)}

    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "o_b_proj", "kv_proj"])
    model = get_peft_model(model, lora)
    shard_model(model)
    frozen = {n: full(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    out["lora"] = train_step(model)
    out["lora"]["frozen_changed"] = [
        n for n, p in model.named_parameters() if n in frozen and not torch.equal(full(p), frozen[n])
    ]
    return out


def train_step(model: torch.nn.Module) -> dict:
    """One AdamW step on this rank's batch; what changed and the dtypes after it."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [full(p).clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    loss = model(batch(20 + dist.get_rank()), labels=batch(20 + dist.get_rank())).loss
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(full(p), b) for p, b in zip(trainable, before))
    return {
        "loss": loss.item(),
        "changed": changed,
        "trainable": len(trainable),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }


def scenario_load(ckpt: str, blind_ckpt: str, corrupt_ckpt: str, missing_key_ckpt: str) -> dict:
    """What memory_efficient_init gives each rank, and the error every rank raises for a bad checkpoint.

    Ranks other than 0 get `blind_ckpt`: the same config, but every weight file is garbage.
    """
    path = ckpt if dist.get_rank() == 0 else blind_ckpt
    original = PreTrainedModel.__dict__["from_pretrained"]
    with memory_efficient_init():
        patched = PreTrainedModel.__dict__["from_pretrained"] is not original
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, low_cpu_mem_usage=True)
        same_class = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    out = {
        "patched": patched,
        "restored": PreTrainedModel.__dict__["from_pretrained"] is original,
        "class": type(model).__name__,
        "all_meta": all(t.is_meta for t in [*model.parameters(), *model.buffers()]),
        "any_meta": any(t.is_meta for t in [*model.parameters(), *model.buffers()]),
        "table": table(model),
        "same_class_table": table(same_class) == table(model),
        "training": model.training,
    }
    for name, bad_path in (("corrupt", corrupt_ckpt), ("missing_key", missing_key_ckpt)):
        try:
            with memory_efficient_init():
                AutoModelForCausalLM.from_pretrained(bad_path, dtype=torch.bfloat16)
            out[name] = None
        except CheckpointLoadError as exc:
            out[name] = str(exc)
    out["restored_after_error"] = PreTrainedModel.__dict__["from_pretrained"] is original
    return out


def main() -> None:
    scenario, out_dir, *args = sys.argv[1:]
    dist.init_process_group("gloo")
    torch.manual_seed(1234 + dist.get_rank())  # different on purpose: nothing may depend on it
    result = globals()[f"scenario_{scenario}"](*args)
    dist.barrier()
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
