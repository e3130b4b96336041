"""Worker for the multi-process tests: one rank of a scenario, result written to `<out>/rank<r>.json`.

Run by `dist_launch.run_ranks` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set:
    python tests/dist_worker.py <scenario> <out_dir> [args...]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from collectives import CollectiveRecorder
from dist_launch import exit_without_teardown
from numerics import FACTOR, FLOOR_ULPS, ulps_off
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM, PreTrainedModel

from hf_dsv4 import CheckpointLoadError, ShardingError, memory_efficient_init, shard_model
from hf_dsv4.loading.stream import stream_source

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


def scenario_stream(ckpt: str, blind_ckpt: str, release_ckpt: str) -> dict:
    """memory_efficient_init(stream=True) + shard_model vs plain from_pretrained, fp32 and bf16, for the Hub layout
    (`ckpt`) and the release layout (`release_ckpt`: FP8/FP4, mtp.* keys): nothing is read before shard_model (every
    rank holds a meta model; for `ckpt`, ranks other than 0 get `blind_ckpt`, garbage weights), then rank 0 streams
    the checkpoint in one decoder layer at a time."""
    out = {}
    for layout, source, other in (("hub", ckpt, blind_ckpt), ("release", release_ckpt, release_ckpt)):
        for dtype_name, cls in (("float32", AutoModelForCausalLM), ("bfloat16", DeepseekV4ForCausalLM)):
            path = source if dist.get_rank() == 0 else other
            with memory_efficient_init(stream=True):
                model = cls.from_pretrained(path, dtype=DTYPES[dtype_name])
            ref = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype_name])
            named = [*model.named_parameters(), *model.named_buffers()]
            result = {"all_meta": all(t.is_meta for _, t in named), "same_table": table(model) == table(ref)}
            config, ref_config = model.config.to_dict(), ref.config.to_dict()
            result["same_config"] = {**config, "_name_or_path": None} == {**ref_config, "_name_or_path": None}
            with units_held() as held:
                shard_model(model, read_ahead=dtype_name == "float32")  # bf16: each unit read in turn
            result["units_read"], result["held_from_earlier_units"] = len(held), held
            result["stream_released"] = stream_source(model) is None
            out[f"{layout}_{dtype_name}"] = {**result, **compare_to_reference(model, ref)}
    out["release_not_streamed"] = release_not_streamed(release_ckpt)
    out["lora"] = streamed_lora(ckpt)
    out["torn"] = torn_stream_error(ckpt, Path(blind_ckpt).parent / "torn")
    out["modules_to_save"] = modules_to_save_error(ckpt)
    return out


def scenario_stream_all(ckpt: str, release_ckpt: str, scratch: str) -> dict:
    """memory_efficient_init(stream=True, readers="all") + shard_model vs plain from_pretrained: every rank reads only
    its own rows of the checkpoint (whole, or in pieces within a read budget of a third of the largest tensor's
    shard), and no floating-point tensor crosses ranks while the shards are filled."""

    out = {}
    runs = [(layout, dtype, False) for layout in ("hub", "release") for dtype in ("float32", "bfloat16")]
    for layout, dtype_name, in_pieces in [*runs, ("hub", "bfloat16", True), ("release", "float32", True)]:
        source = ckpt if layout == "hub" else release_ckpt
        ref = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype_name])
        budget = _a_third_of_the_largest_shard(ref) if in_pieces else None
        with memory_efficient_init(stream=True, readers="all", read_budget=budget):
            model = DeepseekV4ForCausalLM.from_pretrained(source, dtype=DTYPES[dtype_name])
        named = [*model.named_parameters(), *model.named_buffers()]
        result = {
            "all_meta": all(t.is_meta for _, t in named),
            "same_table": table(model) == table(ref),
            "reads_here": stream_source(model).checkpoint is not None,
        }
        with CollectiveRecorder() as recorder, recording_reads() as reads:
            shard_model(model)
        result.update(floating_sent=recorder.floating_elements(), reads=reads, budget=budget, **_row_sizes(ref))
        result["stream_released"] = stream_source(model) is None
        out[f"{layout}_{dtype_name}{'_budget' if in_pieces else ''}"] = {**result, **compare_to_reference(model, ref)}
    out["lora"] = streamed_lora(ckpt, readers="all")
    out["torn"] = torn_stream_error(ckpt, Path(scratch) / "torn", readers="all")
    out["hub_id"] = streamed_hub_id(ckpt, Path(scratch) / "hub")
    return out


def streamed_hub_id(ckpt: str, cache: Path) -> dict:
    """readers="all" with a Hub id (from a local Hugging Face cache, offline): the machine's lowest rank opens it
    first, the others after it (they find the download in the cache); the shards equal stock's."""
    import shutil

    import hf_dsv4.loading.pretrained as pretrained

    snapshot = cache / "models--acme--tiny-dsv4" / "snapshots" / ("0" * 40)
    if dist.get_rank() == 0:
        shutil.copytree(ckpt, snapshot)
        (cache / "models--acme--tiny-dsv4" / "refs").mkdir()
        (cache / "models--acme--tiny-dsv4" / "refs" / "main").write_text("0" * 40)
    dist.barrier()
    spans, originals = [], (pretrained.open_streamed, pretrained._download)

    def timed(what, original):
        def call(*args, **kwargs):
            start = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                spans.append([what, start, time.monotonic()])

        return call

    pretrained.open_streamed, pretrained._download = timed("open", originals[0]), timed("download", originals[1])
    try:
        with memory_efficient_init(stream=True, readers="all"):
            model = AutoModelForCausalLM.from_pretrained(
                "acme/tiny-dsv4", dtype=torch.float32, cache_dir=str(cache), local_files_only=True
            )
    finally:
        pretrained.open_streamed, pretrained._download = originals
    shard_model(model)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    opened = [None] * dist.get_world_size()
    dist.all_gather_object(opened, spans)
    return {"opened": opened, **compare_to_reference(model, ref)}


def scenario_stream_layouts(scratch: str, *layouts: str) -> dict:
    """Every checkpoint layout (`name=path` arguments, `hf_dsv4.testing.layouts`) plus our own sharded export (the
    native layout streamed, sharded and written by `save_pretrained_sharded`), streamed on every rank with readers
    "rank0" and "all" (the latter within a read budget for bf16), fp32 and bf16: each compared with stock
    `from_pretrained` of the same folder in one process, bit for bit."""
    from hf_dsv4 import save_pretrained_sharded

    paths = dict(layout.split("=", 1) for layout in layouts)
    with memory_efficient_init(stream=True):
        native = AutoModelForCausalLM.from_pretrained(paths["native"], dtype=torch.bfloat16)
    shard_model(native)
    export = Path(scratch) / "exported"
    save_pretrained_sharded(native, export)
    dist.barrier()  # rank 0 wrote the export: every rank may open it
    paths["exported"] = str(export)
    out = {}
    for name, path in paths.items():
        for dtype_name in DTYPES:
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name])
            for readers in ("rank0", "all"):
                budget = _a_third_of_the_largest_shard(ref) if readers == "all" and dtype_name == "bfloat16" else None
                with memory_efficient_init(stream=True, readers=readers, read_budget=budget):
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name])
                same_table = table(model) == table(ref)
                shard_model(model)
                out[f"{name}/{dtype_name}/{readers}"] = {"same_table": same_table, **compare_to_reference(model, ref)}
    return out


def _a_third_of_the_largest_shard(model: torch.nn.Module) -> int:
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return largest // dist.get_world_size() // 3


def _row_sizes(model: torch.nn.Module) -> dict:
    return {"largest_row": max(p[0].numel() * p.element_size() for p in model.parameters() if p.dim())}


@contextlib.contextmanager
def recording_reads():
    """The bytes of every part this rank's streamed reader returns, in order."""
    from hf_dsv4.loading.stream import StreamedCheckpoint

    reads, original = [], StreamedCheckpoint.read

    def read(self, prefix, rows=None, only=None):
        part = original(self, prefix, rows, only)
        reads.append(sum(t.numel() * t.element_size() for t in part.values()))
        return part

    StreamedCheckpoint.read = read
    try:
        yield reads
    finally:
        StreamedCheckpoint.read = original


def scenario_stream_budget(ckpt: str, release_ckpt: str, scratch: str) -> dict:
    """shard_model(read_budget=...) on a streamed model: rank 0 reads each rank's rows in pieces of at most the budget
    (converted bytes) and sends them; the budget is a third of the largest tensor's shard, so tensors are cut."""
    out = {}
    for layout, source in (("hub", ckpt), ("release", release_ckpt)):
        for dtype_name in ("float32", "bfloat16"):
            with memory_efficient_init(stream=True):
                model = DeepseekV4ForCausalLM.from_pretrained(source, dtype=DTYPES[dtype_name])
            ref = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype_name])
            budget = _a_third_of_the_largest_shard(ref)
            with recording_reads() as reads:
                shard_model(model, read_budget=budget)
            result = {"budget": budget, "reads": reads, **_row_sizes(ref)}
            out[f"{layout}_{dtype_name}"] = {**result, **compare_to_reference(model, ref)}
    out["lora"] = streamed_lora(ckpt, read_budget=4096)
    out["torn"] = torn_stream_error(ckpt, Path(scratch) / "torn", read_budget=4096)
    return out


def modules_to_save_error(ckpt: str) -> str | None:
    """What shard_model raises on this rank for a streamed model under a LoRA adapter with modules_to_save (peft's
    copies of lm_head are in no checkpoint and not an adapter's new tensors)."""
    from peft import get_peft_model

    from hf_dsv4.training.lora import dsv4_lora_config

    with memory_efficient_init(stream=True):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model = get_peft_model(model, dsv4_lora_config(r=2, targets="attention", modules_to_save=["lm_head"]))
    try:
        shard_model(model)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return f"{type(exc).__name__}: {exc}"
    return None


def torn_stream_error(ckpt: str, copy: Path, readers: str = "rank0", read_budget: int | None = None) -> str | None:
    """What each rank raises when a shard file is cut short after the streamed from_pretrained checked it (the
    checkpoint changed under the running job): rank 0 fails reading decoder layer 1, mid-stream."""
    import shutil

    if dist.get_rank() == 0:
        shutil.copytree(ckpt, copy)
    dist.barrier()
    with memory_efficient_init(stream=True, readers=readers):
        model = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    dist.barrier()  # every rank has opened the files
    if dist.get_rank() == 0:
        index = json.loads((copy / "model.safetensors.index.json").read_text())
        shard = copy / index["weight_map"]["layers.1.attn.wq_a.weight"]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    try:
        shard_model(model, read_budget=read_budget)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def units_held():
    """On rank 0, for each unit the streamed reader reads: [how many units older than the previous one still have a
    tensor alive, whether the previous one does] ([0, False]: one unit held; [0, True]: two, the one being sent and
    the one being read)."""
    import gc
    import weakref

    from hf_dsv4.loading.stream import StreamedCheckpoint

    held, refs, original = [], [], StreamedCheckpoint.read

    def read(self, prefix, rows=None, only=None):
        gc.collect()
        alive = [any(ref() is not None for ref in unit) for unit in refs]
        held.append([sum(alive[:-1]), alive[-1] if alive else False])  # [older units alive, previous unit alive]
        unit = original(self, prefix, rows, only)
        refs.append([weakref.ref(t) for t in unit.values()])
        return unit

    StreamedCheckpoint.read = read
    try:
        yield held
    finally:
        StreamedCheckpoint.read = original


def release_not_streamed(release_ckpt: str) -> dict:
    """The release layout without streaming: rank 0 loads it dequantized, the others build from its config.json."""
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=torch.bfloat16)
    same_config = {**model.config.to_dict(), "_name_or_path": None} == {**ref.config.to_dict(), "_name_or_path": None}
    shard_model(model)
    return {"same_config": same_config, **compare_to_reference(model, ref)}


def streamed_lora(ckpt: str, readers: str = "rank0", read_budget: int | None = None) -> dict:
    """A LoRA adapter added between the streamed from_pretrained and shard_model: the base is read from the
    checkpoint, the adapter starts from rank 0's initial values (A drawn by peft, B zero)."""
    from peft import get_peft_model

    from hf_dsv4.sharding.streamed import checkpoint_name
    from hf_dsv4.training.lora import dsv4_lora_config

    with memory_efficient_init(stream=True, readers=readers, read_budget=read_budget):  # shard_model reads within it
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets="all"))
    shard_model(model)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    base = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
    lora = {n: full(p) for n, p in model.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        logits, ref_logits = model(batch(1)).logits, ref(batch(1)).logits
    return {
        "bad_base": [n for n, p in base if not torch.equal(full(p), ref.get_parameter(checkpoint_name(n, "base_model.model.")))],
        "lora_tensors": len(lora),
        "lora_a_drawn": all(t.count_nonzero() > 0 and bool(torch.isfinite(t).all()) for n, t in lora.items() if ".lora_A." in n),
        "lora_b_zero": all(t.count_nonzero() == 0 for n, t in lora.items() if ".lora_B." in n),
        "lora_digest": hashlib.sha256(b"".join(t.detach().numpy().tobytes() for _, t in sorted(lora.items()))).hexdigest(),
        "logits_equal": torch.equal(logits, ref_logits),
    }  # fmt: skip


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


def grad_parity(ckpt: str, model: torch.nn.Module | None = None) -> dict:
    """fp32 data-parallel gradients (rank r trains on batch r) vs the single-process mean gradient.

    `model`: an fp32 model already sharded by the caller (default: `ckpt` sharded over all ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if model is None:
        with memory_efficient_init():
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        shard_model(model)
    model.train()
    model(batch(10 + rank), labels=batch(10 + rank)).loss.backward()
    grads = _grads(model)

    ref_grads, true_grads = (mean_gradients(ckpt, world, dtype) for dtype in (torch.float32, torch.float64))
    none_mismatch = [n for n in grads if (grads[n] is None) != (ref_grads[n] is None)]
    diffs = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in grads if grads[n] is not None}
    # as close to the float64 mean gradient as the single-process float32 one is (numerics: summation orders differ)
    off = [
        n
        for n in diffs
        if ulps_off(grads[n], true_grads[n]) > FACTOR * ulps_off(ref_grads[n], true_grads[n]) + FLOOR_ULPS
    ]
    return {
        "bitwise_equal": sum(torch.equal(grads[n], ref_grads[n]) for n in diffs),
        "none_mismatch": none_mismatch,
        "not_as_accurate": sorted(off),
        "max_diff": max(diffs.values()),
        "with_grad": len(diffs),
        "without_grad": [n for n in grads if grads[n] is None],
    }


def mean_gradients(ckpt: str, world: int, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """One process's gradients of the mean loss over every rank's batch, the model in `dtype` (float64: the oracle,
    with the eager experts loop: grouped_mm has no float64)."""
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).train()
    if dtype == torch.float64:
        ref.set_experts_implementation("eager")
    for r in range(world):
        (ref(batch(10 + r), labels=batch(10 + r)).loss / world).backward()
    return _grads(ref)


def scenario_hsdp(ckpt: str) -> dict:
    """Hybrid sharding on 4 ranks: a (dp_replicate=2, dp_shard=2) mesh; weights, logits and fp32 gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    start = time.perf_counter()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    shard_model(model, mesh=mesh)
    seconds = {"load_and_shard": time.perf_counter() - start}
    placements, meshes, local_rows = {}, set(), {}
    for name, param in model.named_parameters():
        key = str(param.placements) if isinstance(param, DTensor) else "not a DTensor"
        placements[key] = placements.get(key, 0) + 1
        if isinstance(param, DTensor):
            meshes.add((tuple(param.device_mesh.shape), param.device_mesh.mesh_dim_names))
            local_rows[name] = [list(param.to_local().shape), list(param.shape)]
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.to_local().detach().numpy().tobytes())
    out = {
        "placements": placements,
        "meshes": [list(m) for m in meshes],
        "coordinate": [mesh.get_local_rank("dp_replicate"), mesh.get_local_rank("dp_shard")],
        "local_shapes": local_rows,
        "local_shards_sha256": digest.hexdigest(),
        **compare_to_reference(model, AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)),
    }
    seconds["compare"] = time.perf_counter() - start - seconds["load_and_shard"]
    out["grad_parity"] = grad_parity(ckpt, model)
    out["seconds"] = {**seconds, "total": time.perf_counter() - start}
    return out


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
    with memory_efficient_init(), memory_efficient_init():  # nested: one hook, one agreement per load
        nested = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        out["nested_inner_restored"] = PreTrainedModel.__dict__["from_pretrained"] is not original
    out["nested_restored"] = PreTrainedModel.__dict__["from_pretrained"] is original
    out["nested_all_meta"] = all(t.is_meta for t in [*nested.parameters(), *nested.buffers()])
    out["nested_table"] = table(nested) == out["table"]
    return out


class NeedsTwoArguments(Exception):
    """An exception that pickles but cannot be unpickled (its args are not its constructor's)."""

    def __init__(self, what: str, where: str):
        super().__init__(f"{what} at {where}")


def describe(exc: BaseException) -> dict:
    """Type, message, cause chain and first note of an exception, as the tests compare them."""
    chain, link = [], exc.__cause__
    while link is not None:
        chain.append(f"{type(link).__name__}: {link}")
        link = link.__cause__
    notes = getattr(exc, "__notes__", None) or [None]
    return {"type": type(exc).__name__, "message": str(exc), "chain": chain, "note": notes[0]}


def scenario_errors() -> dict:
    """hf_dsv4.distributed: what each rank raises when one rank fails inside `every_rank_raises` / `on_source`."""
    from hf_dsv4.distributed import every_rank_raises, on_source

    rank = dist.get_rank()
    out = {}

    def rank1_fails_with_a_cause() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("row 3: bad tools") from exc

    def both_fail() -> None:
        raise OSError(f"disk full on rank {rank}")

    def unpicklable() -> None:
        raise NeedsTwoArguments("torn write", "shard 2")

    for name, body, failing in (
        ("every_rank_raises", rank1_fails_with_a_cause, {1}),
        ("lowest_rank_wins", both_fail, {0, 1}),
        ("unpicklable", unpicklable, {1}),
    ):
        try:
            with every_rank_raises():
                if rank in failing:
                    body()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            out[name] = describe(exc)
    try:
        on_source(lambda: rank1_fails_with_a_cause() if rank == 0 else None)
        out["on_source"] = None
    except Exception as exc:  # noqa: BLE001
        out["on_source"] = describe(exc)
    out["on_source_result"] = on_source(lambda: {"read": "by rank 0"})
    with every_rank_raises():
        pass
    out["after"] = "no hang"
    return out


# ------------------------------------------------------------------------------------------------- adapters


def recorder_self_test() -> dict:
    """What the recorder sees of a known all_reduce, broadcast_object_list and DTensor.full_tensor(): proves it is not
    blind to the Python-level API or to DTensor's gathers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    dtensor = distribute_tensor(torch.arange(24.0).reshape(6, 4), mesh, [Shard(0)])
    with CollectiveRecorder() as recorder:
        dist.all_reduce(torch.ones(3))
        dist.broadcast_object_list([{"x": 1}], src=0)
        full_tensor = dtensor.full_tensor()
    return {"summary": recorder.summary(), "full_tensor_ok": torch.equal(full_tensor, torch.arange(24.0).reshape(6, 4))}


def lora_model(ckpt: str, dtype: torch.dtype):
    """The tiny model as every rank builds it (`memory_efficient_init`), with the "all" LoRA preset and, on rank 0,
    random non-zero LoRA B weights (`tests/test_adapter_dist.set_lora_b` does the same in one process)."""
    from peft import get_peft_model

    from hf_dsv4.sharding import align_parameter_adapter_dtypes
    from hf_dsv4.training.lora import dsv4_lora_config

    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    torch.manual_seed(0)
    model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets="all"))
    align_parameter_adapter_dtypes(model)  # what DSV4Accelerator does before sharding
    if dist.get_rank() == 0:
        set_lora_b(model)
    return model


def set_lora_b(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _padded_local_numel(param: torch.Tensor, world: int) -> int:
    """Elements of one rank's Shard(0) chunk as DTensor sends it to an all-gather (uneven chunks padded)."""
    rows = -(-param.shape[0] // world) if param.dim() else 1
    return rows * (param[0].numel() if param.dim() else 1)


def _sizes(model: torch.nn.Module) -> dict:
    world = dist.get_world_size()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "trainable_tensors": len(trainable),
        "trainable_elements": sum(p.numel() for p in trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "trainable_local_elements": sum(p.to_local().numel() for p in trainable),
        "trainable_padded_local_elements": sum(_padded_local_numel(p, world) for p in trainable),
        "trainable_padded_local_bytes": sum(_padded_local_numel(p, world) * p.element_size() for p in trainable),
        "trainable_dtensors": sum(isinstance(p, DTensor) for p in trainable),
        "frozen_elements": sum(p.numel() for p in frozen),
        "frozen_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "buffer_elements": sum(b.numel() for b in model.buffers()),
    }


def scenario_adapter(ckpt: str, out_dir: str) -> dict:
    """save_adapter (collectives recorded), zero the adapter, load_adapter, gather again; a missing adapter."""
    from safetensors.torch import load_file

    from hf_dsv4.training.adapter import ADAPTER_WEIGHTS, gather_adapter, load_adapter, save_adapter

    out = {"self_test": recorder_self_test()}
    for dtype_name, dtype in DTYPES.items():
        model = lora_model(ckpt, dtype)
        shard_model(model)
        folder = Path(out_dir) / f"adapter_{dtype_name}"
        with CollectiveRecorder() as save_record:
            returned = save_adapter(model, folder)
        result = {**_sizes(model), "returned": None if returned is None else str(returned)}
        result["save_calls"], result["save"] = save_record.calls, save_record.summary()

        frozen = {n: p.to_local().clone() for n, p in model.named_parameters() if not p.requires_grad}
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.to_local().zero_()
        zeroed = gather_adapter(model)
        result["zeroed_nonzero"] = [k for k, t in zeroed.items() if t.count_nonzero()]
        with CollectiveRecorder() as load_record:
            load_adapter(model, folder)
        result["load"] = load_record.summary()
        reloaded = gather_adapter(model)
        if dist.get_rank() == 0:
            stored = load_file(folder / ADAPTER_WEIGHTS)
            result["reload_keys_equal"] = sorted(reloaded) == sorted(stored)
            result["reload_not_equal"] = [
                k for k in stored if k not in reloaded or not torch.equal(reloaded[k], stored[k])
                or reloaded[k].dtype != stored[k].dtype
            ]  # fmt: skip
            result["reload_tensors"] = len(reloaded)
        result["frozen_changed_by_load"] = [
            n for n, p in model.named_parameters() if n in frozen and not torch.equal(p.to_local(), frozen[n])
        ]
        try:
            load_adapter(model, Path(out_dir) / "no_such_adapter")
            result["missing"] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            result["missing"] = f"{type(exc).__name__}: {exc}"
            result["missing_note"] = (getattr(exc, "__notes__", None) or [None])[0]
        out[dtype_name] = result
    out["save_error"] = save_error(model, Path(out_dir) / "a_file")
    return out


def save_error(model: torch.nn.Module, target: Path) -> str | None:
    """What `save_adapter` raises on this rank when rank 0 cannot write (`target` is a file, not a folder)."""
    from hf_dsv4.training.adapter import save_adapter

    if dist.get_rank() == 0:
        target.write_text("not a folder")
    try:
        save_adapter(model, target)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return f"{type(exc).__name__}: {exc}"
    return None


def scenario_export(ckpt: str, out_dir: str) -> dict:
    """save_pretrained_sharded of the tiny bf16 model (fp32-kept modules inside) sharded on every rank, collectives
    recorded; what each rank sends compared with its own shards."""
    from hf_dsv4 import save_pretrained_sharded

    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    shard_model(model)
    world = dist.get_world_size()
    shards = [p for p in model.parameters() if isinstance(p, DTensor)]
    with CollectiveRecorder() as record:
        returned = save_pretrained_sharded(model, Path(out_dir) / "export")
    return {
        "returned": None if returned is None else str(returned),
        "save": record.summary(),
        "sharded_tensors": len(shards),
        "padded_local_elements": sum(_padded_local_numel(p, world) for p in shards),
        "model_elements": sum(t.numel() for t in [*model.parameters(), *model.buffers()]),
        "largest_tensor": max(t.numel() for t in [*model.parameters(), *model.buffers()]),
        "largest_call": max(call["elements"] for call in record.calls),
        "peft_refused": peft_export_error(ckpt, Path(out_dir) / "peft_export"),
    }


def peft_export_error(ckpt: str, folder: Path) -> str | None:
    """What save_pretrained_sharded raises on this rank for a sharded model under a LoRA adapter."""
    from hf_dsv4 import save_pretrained_sharded

    model = lora_model(ckpt, torch.float32)
    shard_model(model)
    try:
        save_pretrained_sharded(model, folder)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return f"{type(exc).__name__}: {exc}"
    return None


def _nonzero_lora_b(model: torch.nn.Module) -> None:
    """Every sharded LoRA B of `model` set to the same random values whatever the run (seeded by its name)."""
    import zlib

    from hf_dsv4.sharding.fill import own_rows

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                values = torch.randn(param.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
                start, stop = own_rows(param) or (0, param.shape[0])
                local = param.to_local() if isinstance(param, DTensor) else param
                local.copy_(0.5 * values[start:stop])


def quantized_lora(
    release_ckpt: str,
    dtype: torch.dtype,
    targets: str,
    keep: bool | str,
    stream: dict | None = None,
    checkpointing: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """The release checkpoint streamed (quantized-resident with `keep`; `stream`: more memory_efficient_init
    arguments), a seeded LoRA adapter of `targets` (B non-zero), sharded over every rank; `kwargs` go to
    from_pretrained."""
    from peft import get_peft_model

    from hf_dsv4.training.lora import dsv4_lora_config, seeded_lora_init

    with memory_efficient_init(stream=True, keep_quantized=keep, **(stream or {})):
        model = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=dtype, **kwargs)
    if checkpointing:  # activation checkpointing per decoder layer, as the Trainer turns it on before sharding
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets=targets))
    shard_model(model, init_adapter=seeded_lora_init(3))
    _nonzero_lora_b(model)
    return model


def _local_bytes(model: torch.nn.Module) -> dict[str, int]:
    """This rank's bytes of its parameters' shards: a quantized weight's are its codes and scales (uint8)."""
    from hf_dsv4.sharding.quantized import QuantizedWeight

    local = [p.to_local() if isinstance(p, DTensor) else p for _, p in model.named_parameters()]
    parts = [t for w in local for t in ((w.codes, w.scale) if isinstance(w, QuantizedWeight) else (w,))]
    return {
        "quantized": sum(t.numel() for t in parts if t.dtype == torch.uint8),
        "all": sum(t.numel() * t.element_size() for t in parts),
    }


def quantized_step(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every LoRA gradient (whole) of one forward + backward on this rank's batch."""
    model.train()
    out = model(batch(seed + dist.get_rank()), labels=batch(seed + dist.get_rank()))
    out.loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _adapter_on_dequantized_base(release_ckpt: str, dtype: torch.dtype, targets: str) -> dict:
    """The adapter of a quantized-resident model (gathered) put on the dequantized base in one process (transformers
    dequantizes it, peft adds the adapter): the same logits as the quantized model."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from hf_dsv4.training.lora import dsv4_lora_config

    model = quantized_lora(release_ckpt, dtype, targets, "per_expert")
    with torch.no_grad():
        logits = model(batch(5)).logits
    adapter = {k: full(v).detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    del model
    base = AutoModelForCausalLM.from_pretrained(release_ckpt, dtype=dtype, experts_implementation="eager")
    reference = get_peft_model(base, dsv4_lora_config(r=4, alpha=8, targets=targets))
    missing = set_peft_model_state_dict(reference, adapter).unexpected_keys
    with torch.no_grad():
        reference_logits = reference(batch(5)).logits
    return {"logits_equal": torch.equal(logits, reference_logits), "unexpected": list(missing), "tensors": len(adapter)}


def _with_activation_checkpointing(release_ckpt: str, dtype: torch.dtype, targets: str) -> dict:
    """Decoder layers checkpointed (recomputed in backward): quantized (as one stack) vs dequantized, bit for bit;
    the quantized modules then leave recomputing to the checkpoints."""
    from hf_dsv4.sharding import quantized_modules

    runs = {}
    for keep in ("stack", False):
        model = quantized_lora(release_ckpt, dtype, targets, keep, checkpointing=True)
        flags = {module.recompute_in_backward for module in quantized_modules(model).values()}
        runs[keep] = (*quantized_step(model, 30), flags)
        del model
    (logits, grads, flags), (reference, reference_grads, _) = runs["stack"], runs[False]
    return {
        "logits_equal": torch.equal(logits, reference),
        "grads_equal": sorted(grads) == sorted(reference_grads)
        and all(torch.equal(grads[n], reference_grads[n]) for n in grads),
        "recompute_flags": sorted(flags),
    }


def _quantized_vs_dequantized(release_ckpt: str, dtype_name: str, targets: str, experts: str) -> tuple[dict, dict]:
    """One case of the quantized-resident base vs the dequantized one (experts per expert vs transformers' eager
    loop, as one stack vs its default): (the runs by keep, the comparison)."""
    dtype = DTYPES[dtype_name]
    runs = {}
    for keep in (experts, False):
        implementation = {"experts_implementation": "eager"} if experts == "per_expert" and not keep else {}
        model = quantized_lora(release_ckpt, dtype, targets, keep, **implementation)
        runs[bool(keep)] = (*quantized_step(model, 20), _local_bytes(model))
        del model
    (q_logits, q_grads, q_bytes), (d_logits, d_grads, d_bytes) = runs[True], runs[False]
    return runs, {
        "logits_equal": torch.equal(q_logits, d_logits),
        "logits_max_diff": (q_logits.float() - d_logits.float()).abs().max().item(),
        "same_grads": sorted(q_grads) == sorted(d_grads),
        "grads": len(q_grads),
        "grads_equal": sum(torch.equal(q_grads[n], d_grads[n]) for n in q_grads if n in d_grads),
        "grads_max_diff": max((q_grads[n] - d_grads[n]).abs().max().item() for n in q_grads if n in d_grads),
        "grads_max_relative": max(
            ((q_grads[n].float() - d_grads[n].float()).abs().max() / d_grads[n].float().abs().max()).item()
            for n in q_grads
            if n in d_grads
        ),
        "not_equal": sorted(n for n in q_grads if n in d_grads and not torch.equal(q_grads[n], d_grads[n])),
        "bytes": [q_bytes, d_bytes],
    }


def scenario_quantized(release_ckpt: str) -> dict:
    """Quantized-resident base vs the dequantized one: logits and LoRA gradients, fp32 and bf16, with and without
    routed-expert adapters; experts computed per expert (vs transformers' eager experts over the dequantized base)
    or as one stack (vs its default, grouped_mm)."""
    results = {}
    cases = [("float32", "all", "per_expert"), ("bfloat16", "all", "per_expert"), ("bfloat16", "all", "stack"),
             ("float32", "attention+shared", "per_expert")]  # fmt: skip
    for dtype_name, targets, experts in cases:
        dtype = DTYPES[dtype_name]
        runs, results[f"{dtype_name}/{targets}/{experts}"] = _quantized_vs_dequantized(
            release_ckpt, dtype_name, targets, experts
        )
        if dtype_name == "float32" and targets == "all":
            results["adapter_on_dequantized_base"] = _adapter_on_dequantized_base(release_ckpt, dtype, targets)
            results["activation_checkpointing"] = _with_activation_checkpointing(release_ckpt, dtype, targets)
            # every rank reading its own rows, in 64 KB pieces
            model = quantized_lora(release_ckpt, dtype, targets, experts, {"readers": "all", "read_budget": 2**16})
            logits, grads = quantized_step(model, 20)
            del model
            results["readers_all_in_pieces"] = {
                "logits_equal": torch.equal(logits, runs[True][0]),
                "grads_equal": sorted(grads) == sorted(runs[True][1])
                and all(torch.equal(grads[n], runs[True][1][n]) for n in grads),
            }
    return results


def scenario_quantized_uneven(release_ckpt: str) -> dict:
    """The quantized base over a world size that divides none of its row counts (3 ranks: 256 rows as 86/86/84, an
    FP8 weight's 2 rows of 128x128 scale blocks as 1/1/0, 4 experts as 2/2/0): FSDP2 pads each shard, the last rank
    holds an empty one. Experts per expert in float32 and as one stack in bf16, vs the dequantized base."""
    from hf_dsv4.sharding.quantized import QuantizedWeight

    results = {}
    for dtype_name, experts in (("float32", "per_expert"), ("bfloat16", "stack")):
        _, results[f"{dtype_name}/all/{experts}"] = _quantized_vs_dequantized(release_ckpt, dtype_name, "all", experts)
    model = quantized_lora(release_ckpt, torch.float32, "all", "per_expert")
    rows = {
        name: param.to_local().codes.shape[0]
        for name, param in model.named_parameters()
        if isinstance(param, DTensor) and isinstance(param.to_local(), QuantizedWeight)
    }
    results["local_rows"] = rows
    return results


def scenario_sparse_attention(ckpt: str) -> dict:
    """FSDP2 (2 ranks, fp32, LoRA "all"): sparse attention vs transformers' attention (and, as the oracle of the
    float32 comparison, transformers' attention in float64: `numerics`), each rank its own padded
    batch of 45 tokens (not a multiple of the compression ratios, the window or the chunk), chunks of 6 queries;
    and the same with decoder layers checkpointed (recomputed in backward, chunks recomputed inside)."""
    from hf_dsv4 import enable_sparse_attention

    rank = dist.get_rank()
    ids = batch(40 + rank, length=45)
    mask = torch.ones_like(ids)
    mask[1, : 5 + rank] = 0
    runs = {}
    for name in ("float64", "stock", "sparse", "sparse_checkpointed"):
        model = lora_model(ckpt, torch.float64 if name == "float64" else torch.float32)
        if name == "float64":  # the oracle: transformers' attention in float64 (grouped_mm has no float64)
            model.get_base_model().set_experts_implementation("eager")
        elif name != "stock":
            enable_sparse_attention(model, chunk_size=6)
        if name == "sparse_checkpointed":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        shard_model(model)
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        runs[name] = (out.logits.detach(), grads)
        del model
    (want, want_grads), (truth, true_grads) = runs["stock"], runs["float64"]

    def off(ours: torch.Tensor, stock: torch.Tensor, exact: torch.Tensor) -> bool:
        return ulps_off(ours, exact) > FACTOR * ulps_off(stock, exact) + FLOOR_ULPS

    result = {}
    for name in ("sparse", "sparse_checkpointed"):
        got, grads = runs[name]
        result[name] = {
            "logits_not_as_accurate": off(got, want, truth),
            "same_grads": sorted(grads) == sorted(want_grads) == sorted(true_grads),
            "grads": len(grads),
            "grads_not_as_accurate": sorted(n for n in grads if off(grads[n], want_grads[n], true_grads[n])),
        }
    result["checkpointed_equal"] = torch.equal(runs["sparse"][0], runs["sparse_checkpointed"][0]) and all(
        torch.equal(runs["sparse"][1][n], runs["sparse_checkpointed"][1][n]) for n in runs["sparse"][1]
    )
    return result


def scenario_packed(ckpt: str) -> dict:
    """FSDP2 (2 ranks, LoRA "all", float64 throughout: `numerics.float64_throughout`), sparse attention: each rank's
    four samples (lengths off and on the compression ratios, one shorter than a block) packed into one row, vs the
    same samples each run alone; the logits per sample and every gradient (reduced over ranks, summed over the
    samples); and the packed row with decoder layers checkpointed (recomputed in backward) against the same without,
    bit for bit (as transformers computes: a checkpoint's recompute runs outside `float64_throughout`)."""
    from numerics import float64_throughout

    from hf_dsv4 import enable_sparse_attention

    rank = dist.get_rank()
    lengths = [[13, 32, 3, 21], [8, 40, 1, 19]][rank]
    generator = torch.Generator().manual_seed(50 + rank)
    samples = [torch.randint(3, 600, (n,), generator=generator) for n in lengths]
    weights = [torch.randn(n, 1024, generator=generator, dtype=torch.float64) for n in lengths]
    runs = {}
    for name in ("alone", "packed", "packed_plain", "packed_checkpointed"):
        model = lora_model(ckpt, torch.float64)
        model.get_base_model().set_experts_implementation("eager")
        enable_sparse_attention(model, chunk_size=6)
        if name == "packed_checkpointed":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        shard_model(model)
        model.train()
        logits = []
        with float64_throughout() if name in ("alone", "packed") else contextlib.nullcontext():
            if name == "alone":
                for ids, weight in zip(samples, weights, strict=True):
                    out = model(input_ids=ids[None]).logits[0]
                    (out[:, : weight.shape[1]] * weight).sum().backward()
                    logits.append(out.detach())
            else:
                positions = torch.cat([torch.arange(n) for n in lengths])[None]
                out = model(input_ids=torch.cat(samples)[None], position_ids=positions).logits[0]
                parts = out.split(lengths)
                sum((part[:, : w.shape[1]] * w).sum() for part, w in zip(parts, weights, strict=True)).backward()
                logits = [part.detach() for part in parts]
        runs[name] = (logits, {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
        del model

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()

    (want, want_grads), (got, got_grads) = runs["alone"], runs["packed"]
    checked = [n for n in want_grads if want_grads[n].abs().max() > 1e-12]
    plain = ("packed_plain", "packed_checkpointed")
    return {
        "logits": max(rel(a, b) for a, b in zip(got, want, strict=True)),
        "same_grads": sorted(got_grads) == sorted(want_grads),
        "grads": len(checked),
        "lora_grads": sum(".lora_" in n for n in checked),
        "worst_grad": max(rel(got_grads[n], want_grads[n]) for n in checked),
        "checkpointed_equal": all(torch.equal(a, b) for a, b in zip(*(runs[k][0] for k in plain), strict=True))
        and all(torch.equal(runs[plain[0]][1][n], runs[plain[1]][1][n]) for n in got_grads),
    }


def scenario_context_parallel(length: str) -> dict:
    """Context parallelism on every rank of the world (2 or 4), float64 throughout (`numerics`), the tiny model with
    all three attention types twice (random sinks and position biases, the indexer keeping 3), sparse attention in
    chunks of 5: each rank runs its chunk of one `length`-token sequence (`chunk_bounds`), the loss a fixed random
    weighting of its logits; vs the whole sequence in one process. Logits gathered, gradients summed over ranks."""
    from numerics import float64_throughout

    from hf_dsv4.modeling import enable_sparse_attention
    from hf_dsv4.modeling.context_parallel import chunk_bounds, chunk_inputs, enable_context_parallel
    from hf_dsv4.testing.model import tiny_dsv4_model

    types = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * 2
    length, rank, world = int(length), dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 1000, (1, length), generator=generator)
    weight = torch.randn(1, length, 1024, generator=generator, dtype=torch.float64)
    start, stop = chunk_bounds(length, world)[rank]
    runs = {}
    for name in ("whole", "parallel", "sharded", "sharded_plain", "sharded_checkpointed"):
        model = enable_sparse_attention(tiny_dsv4_model(types, torch.float64, index_topk=3), chunk_size=5)
        if name == "sharded_checkpointed":  # decoder layers recomputed in backward (outside float64_throughout)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if name.startswith("sharded"):  # FSDP2 over the same ranks
            shard_model(model)
        model.train()
        with float64_throughout() if name in ("whole", "parallel", "sharded") else contextlib.nullcontext():
            if name == "whole":
                logits = model(input_ids=ids).logits
                (logits * weight).sum().backward()
            else:
                enable_context_parallel(model)
                if name == "parallel":  # positions only: each layer all-gathers the ranks' bounds
                    inputs = {"input_ids": ids[:, start:stop], "position_ids": torch.arange(start, stop)[None]}
                else:  # as the trainer hands them: every rank's bounds in the batch, no collective to learn them
                    inputs = chunk_inputs({"input_ids": ids}, rank, world)
                part = model(**inputs).logits
                (part * weight[:, start:stop]).sum().backward()
                logits = torch.cat(_gathered_rows(part.detach(), length, world), dim=1)
        grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
        if name.startswith("sharded"):  # FSDP2 averages the ranks' shares: the sum is world x that
            grads = {n: world * g for n, g in grads.items()}
        if name == "parallel":  # every rank's share, summed (an expert no token of a chunk reached has none)
            grads = {n: grads.get(n, torch.zeros_like(p)) for n, p in model.named_parameters()}
            for grad in grads.values():
                dist.all_reduce(grad)
        runs[name] = (logits.detach(), grads)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()

    (want, want_grads), (got, got_grads) = runs["whole"], runs["parallel"]
    checked = [n for n in want_grads if want_grads[n].abs().max() > 1e-12]
    sharded, sharded_grads = runs["sharded"]
    (plain, plain_grads), (recomputed, recomputed_grads) = runs["sharded_plain"], runs["sharded_checkpointed"]
    return {
        "checkpointed_equal": torch.equal(plain, recomputed)
        and all(torch.equal(plain_grads[n], recomputed_grads[n]) for n in plain_grads),
        "sharded_logits": rel(sharded, want),
        "sharded_worst_grad": max((rel(sharded_grads[n], want_grads[n]), n) for n in checked),
        "chunk": [start, stop],
        "logits": rel(got, want),
        "same_grads": set(want_grads) <= set(got_grads)
        and all(not got_grads[n].any() for n in set(got_grads) - set(want_grads)),
        "grads": len(checked),
        "worst_grad": max((rel(got_grads[n], want_grads[n]), n) for n in checked),
    }


def scenario_context_parallel_packed() -> dict:
    """A packed row split across every rank of the world (2 or 4): seven samples (13, 32, 3, 21, 8, 40, 1 tokens,
    positions restarting at 0) in one 118-token row, float64 throughout, the tiny model with all three attention
    types twice (the indexer keeping 3), sparse attention in chunks of 5; each rank its chunk (`chunk_inputs`: the
    row's bounds and samples handed in), plain and FSDP2-sharded; vs the packed row in one process (which equals each
    sample alone, tests/test_packing.py). Logits gathered, gradients summed over ranks."""
    from numerics import float64_throughout

    from hf_dsv4.modeling import enable_sparse_attention
    from hf_dsv4.modeling.context_parallel import chunk_inputs, enable_context_parallel
    from hf_dsv4.testing.model import tiny_dsv4_model

    types = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * 2
    lengths = [13, 32, 3, 21, 8, 40, 1]
    rank, world, length = dist.get_rank(), dist.get_world_size(), sum(lengths)
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 1000, (1, length), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    weight = torch.randn(1, length, 1024, generator=generator, dtype=torch.float64)
    runs = {}
    for name in ("whole", "parallel", "sharded"):
        model = enable_sparse_attention(tiny_dsv4_model(types, torch.float64, index_topk=3), chunk_size=5)
        if name == "sharded":
            shard_model(model)
        model.train()
        with float64_throughout():
            if name == "whole":
                logits = model(input_ids=ids, position_ids=positions).logits
                (logits * weight).sum().backward()
            else:
                enable_context_parallel(model)
                inputs = chunk_inputs({"input_ids": ids, "position_ids": positions}, rank, world)
                start, stop = inputs["context_parallel_bounds"][rank]
                part = model(**inputs).logits
                (part * weight[:, start:stop]).sum().backward()
                logits = torch.cat(_gathered_rows(part.detach(), length, world), dim=1)
        grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
        if name == "sharded":  # FSDP2 averages the ranks' shares
            grads = {n: world * g for n, g in grads.items()}
        else:
            grads = {n: grads.get(n, torch.zeros_like(p)) for n, p in model.named_parameters()}
        if name == "parallel":
            for grad in grads.values():
                dist.all_reduce(grad)
        runs[name] = (logits.detach(), grads)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()

    want, want_grads = runs["whole"]
    checked = [n for n in want_grads if want_grads[n].abs().max() > 1e-12]
    out = {"grads": len(checked), "samples": len(inputs.get("context_parallel_samples", ()))}
    for name in ("parallel", "sharded"):
        got, got_grads = runs[name]
        out[name] = {
            "logits": rel(got, want),
            "worst_grad": max((rel(got_grads[n], want_grads[n]), n) for n in checked),
            "extra": sorted(n for n in set(got_grads) - set(checked) if got_grads[n].abs().max() > 1e-12),
        }
    return out


def _gathered_rows(part: torch.Tensor, length: int, world: int) -> list[torch.Tensor]:
    """Every rank's `[1, n_r, V]` rows (n_r from `chunk_bounds`), in rank order."""
    from hf_dsv4.modeling.context_parallel import chunk_bounds

    bounds = chunk_bounds(length, world)
    most = max(b - a for a, b in bounds)
    padded = torch.nn.functional.pad(part, (0, 0, 0, most - part.shape[1]))
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:, : b - a] for o, (a, b) in zip(out, bounds, strict=True)]


def scenario_uneven_lengths() -> dict:
    """FSDP2 data parallelism, rank 0's batch shorter than one HCA block (6 < 8 tokens: its HCA compressor makes no
    entry), rank 1's longer: one training step must reduce the same tensors on both ranks (the empty entries are
    computed from the projections: zero gradients, not none) and give the gradients of the two batches."""
    from numerics import float64_throughout

    from hf_dsv4.modeling import enable_sparse_attention
    from hf_dsv4.testing.model import tiny_dsv4_model

    types = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    rank = dist.get_rank()
    batches = [batch(60, size=1, length=6), batch(61, size=1, length=20)]
    whole = enable_sparse_attention(tiny_dsv4_model(types, torch.float64, index_topk=3))
    model = enable_sparse_attention(tiny_dsv4_model(types, torch.float64, index_topk=3))
    shard_model(model)
    with float64_throughout():  # the hash router's gradient cancels: float32 islands would blur it
        for ids in batches:  # what the two ranks compute together: the sum of the two losses (FSDP2 averages: / 2)
            (whole(input_ids=ids).logits.sum() / 2).backward()
        model(input_ids=batches[rank]).logits.sum().backward()
    grads = {n: full(p.grad) if p.grad is not None else None for n, p in model.named_parameters()}
    want = {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}
    hca = [n for n in want if "layers.2.self_attn.compressor" in n]
    return {
        "hca_params": len(hca),
        "missing": sorted(n for n in want if grads[n] is None),
        "worst": max(
            (((grads[n] - want[n]).abs().max() / want[n].abs().max()).item(), n)
            for n in want
            if want[n].abs().max() > 1e-12 and grads[n] is not None  # the hash router's: ~1e-17, exactly 0 in theory
        ),
    }


def scenario_hub_download(cache_dir: str, repo_id: str) -> dict:
    """A Hub id whose download (a stand-in for huggingface_hub's: sleeps past the process group's timeout, then
    resolves the id in a local Hugging Face cache) outlasts the default group's timeout: every way of loading must
    wait for it instead of timing out, and a failed download must be raised on every rank."""
    from hf_dsv4.loading import pretrained

    real, calls = pretrained._download, []

    def slow_download(repo, kwargs, fail=False):
        calls.append(repo)
        time.sleep(1.5 * PG_TIMEOUT_S)
        if fail:
            raise OSError(f"could not reach the Hub for {repo}")
        return real(repo, kwargs)

    result = {}
    hub = {"cache_dir": cache_dir, "local_files_only": True, "dtype": torch.float32}
    for name, stream, readers in [("rank0", False, "rank0"), ("stream_all", True, "all")]:
        calls.clear()
        pretrained._download = slow_download
        try:
            with memory_efficient_init(stream=stream, readers=readers):
                model = AutoModelForCausalLM.from_pretrained(repo_id, **hub)
        finally:
            pretrained._download = real
        source = stream_source(model)
        result[name] = {
            "downloads": list(calls),
            "name_or_path": model.config.name_or_path,
            "on_meta": all(p.is_meta for p in model.parameters()),
            "reads": source is not None and source.checkpoint is not None,
        }
    pretrained._download = lambda repo, kwargs: slow_download(repo, kwargs, fail=dist.get_rank() == 0)
    try:
        with memory_efficient_init():
            AutoModelForCausalLM.from_pretrained(repo_id, **hub)
    except CheckpointLoadError as exc:
        result["failed"] = str(exc)
    finally:
        pretrained._download = real
    return result


PG_TIMEOUT_S = 4
scenario_hub_download.pg_timeout = PG_TIMEOUT_S  # shorter than the download: the default group would time out


def scenario_rank_failures(ckpt: str, release_ckpt: str) -> dict:
    """A failure injected at each step that one rank runs alone before a collective of `shard_model` (rank 0's
    quantized plan, rank 0's part of a unit checked before DCP's broadcast, a rank's assignment of its shards after
    its own reads or rank 0's pieces): every rank raises the same error at once, none waits for the process group's
    timeout (30 s here)."""
    from hf_dsv4.loading.stream import StreamedCheckpoint
    from hf_dsv4.sharding import fill

    rank = dist.get_rank()
    real_plan, real_read, real_assign = StreamedCheckpoint.quantized_plan, StreamedCheckpoint.read, fill._assign

    def plan_fails(self):
        raise OSError("the quantization config cannot be read")

    def read_misfits(self, *args, **kwargs):  # one tensor in the wrong dtype
        part = real_read(self, *args, **kwargs)
        first = min(part)
        return {**part, first: part[first].double()}

    def assign_fails_on_rank_1(*args):
        if rank == 1:
            raise RuntimeError("out of memory assigning the shards")
        return real_assign(*args)

    cases = {
        "quantized_plan": (release_ckpt, {"keep_quantized": True}, (StreamedCheckpoint, "quantized_plan", plan_fails)),
        "rank0_part": (ckpt, {}, (StreamedCheckpoint, "read", read_misfits)),
        "own_rows": (ckpt, {"readers": "all"}, (fill, "_assign", assign_fails_on_rank_1)),
        "pieces": (ckpt, {"read_budget": 2**14}, (fill, "_assign", assign_fails_on_rank_1)),
    }
    out = {}
    for name, (source, stream, (owner, attr, failing)) in cases.items():
        with memory_efficient_init(stream=True, **stream):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        setattr(owner, attr, failing)
        start = time.monotonic()
        try:
            shard_model(model)
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
        finally:
            StreamedCheckpoint.quantized_plan, StreamedCheckpoint.read, fill._assign = real_plan, real_read, real_assign
        dist.barrier()
    return out


scenario_rank_failures.pg_timeout = 30


def main() -> None:
    scenario, out_dir, *args = sys.argv[1:]
    run = globals()[f"scenario_{scenario}"]
    timeout = getattr(run, "pg_timeout", None)
    dist.init_process_group("gloo", **({"timeout": timedelta(seconds=timeout)} if timeout else {}))
    torch.manual_seed(1234 + dist.get_rank())  # different on purpose: nothing may depend on it
    result = run(*args)
    dist.barrier()
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    exit_without_teardown()


if __name__ == "__main__":
    main()
