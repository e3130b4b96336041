"""A Flash-scale rehearsal of the project's training step on N GPUs, traced in one process without allocating.

    python benchmarks/flash_rehearsal.py --ranks 8 --tokens 4096 --targets all --keep-quantized
    python benchmarks/flash_rehearsal.py --ranks 8 --tokens 16384 --targets attention --json
    python benchmarks/flash_rehearsal.py --ranks 8 --targets all --keep-quantized --fit 80   # longest L in 80 GB
    python benchmarks/flash_rehearsal.py --tiny --check     # the trace vs a real 2-rank gloo run of the same step

DeepSeek-V4-Flash from its real config on meta (43 layers: 2 sliding, then CSA / HCA alternating; 256 routed experts
of 2048 + 1 shared, top-6; the first 3 MoE layers hash-routed; `bench_flash_slice.FLASH`), bf16, trained the way the
project trains it, each step with the project's own code:

- activation checkpointing (transformers' `activation_checkpointing_enable`, non-reentrant, every decoder layer) and
  TRL's fused LM head (`add_fused_lm_head`, what `DSV4SFTTrainer`'s `compute_loss` calls: no full logits);
- LoRA r=16 alpha=32 through peft (`dsv4_lora_config(targets=--targets)`);
- hf_dsv4's sparse attention (`enable_sparse_attention`, the portable kernel, chunk 256);
- with `--keep-quantized` the quantized-resident base (`quantize_base` with the plan the release checkpoint's reader
  gives: FP8 + ue8m0 128x128 for attention / shared / indexer projections, FP4 + ue8m0 1x32 for routed experts;
  experts per expert); without it the dequantized bf16 base (transformers' grouped_mm experts);
- FSDP2 per decoder layer and dtype exactly as `shard_model` lays it out (`align_parameter_adapter_dtypes`,
  `apply_fsdp`, bf16 parameters with fp32 gradient reduction: `fp32_reduction`, as `accelerate launch` gives it);
- one step of forward, backward and fused AdamW (the Trainer's default `adamw_torch_fused`), batch 1 x --tokens per
  rank, its AdamW state made beforehand (a steady-state step: the moments live from its start).

N ranks live in one process: torch's fake process group (world size N, this process is rank 0, collectives return
without moving data) and `FakeTensorMode` (tensors with shapes, dtypes and devices, no storage), on CPU devices (fake
CUDA tensors need a driver; the bytes are the same); torch's FSDP2 memory tracker counts the live tensors of rank 0
by category (sharded / unsharded parameters, gradients, activations, temporaries, all-gather and reduce-scatter
buffers, optimizer state) at the peak. These torch internals are reached only through `hf_dsv4.compat`. The peak is
the logical one (live tensors): a GPU adds the caching allocator's fragmentation and the CUDA context (~1 GB).

One stand-in: transformers' eager experts loop, which keep_quantized's per-expert path runs, asks `nonzero` which
experts got tokens (a data-dependent shape that fake tensors cannot have); the trace replaces the loop, and only the
loop, by one that computes the same ops on balanced routing (each expert gets tokens x top-k / experts rows), each
expert's weight still dequantized by the project's code when the loop reaches it. What the loop saves for backward
is the routed rows, whatever the routing, so the bytes are the same; `--tiny --check` holds the trace to a real run.

`--tiny --check`: the tiny DeepSeek-V4 (`hf_dsv4.testing`; with `--keep-quantized` its release-layout width) traced
on 2 fake ranks vs the same step measured in a real 2-rank gloo run (real tensors, the same tracker; max over
ranks, the eager experts loop itself): exit status 0 if the traced peak is within 5% of the measured one, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_flash_slice import FLASH_LAYERS  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

GIB = 2**30
CHECK_RANKS = 2
TOLERANCE = 0.05
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what DSV4SFTTrainer (TRL's SFTTrainer) asks the fused head for


# ---------------------------------------------------------------------------------------------- the model


def flash_config(layers: int = FLASH_LAYERS):
    """DeepSeek-V4-Flash's config (`bench_flash_slice.FLASH`), its first `layers` decoder layers (43: all)."""
    from bench_flash_slice import FLASH, FLASH_SCHEDULE
    from transformers import DeepseekV4Config

    schedule = {key: values[:layers] for key, values in FLASH_SCHEDULE.items()}
    return DeepseekV4Config(**FLASH, num_hidden_layers=layers, **schedule)


def tiny_config(keep_quantized: bool):
    """The tiny DeepSeek-V4 of the tests; widened to the release layout's blocks when kept quantized."""
    from hf_dsv4.testing.model import tiny_dsv4_config
    from hf_dsv4.testing.release import release_dsv4_config

    return release_dsv4_config() if keep_quantized else tiny_dsv4_config()


def release_plan(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """The quantized plan the release checkpoint's reader gives for `model` (a transformers DeepSeek-V4, on meta):
    the weights DeepSeek stores in FP8 (codes as is + ue8m0 128x128 blocks) or FP4 (routed experts: two codes per
    byte + ue8m0 1x32 blocks), as `StreamedCheckpoint.quantized_plan` names and shapes them."""
    from hf_dsv4.testing.model import hub_name
    from hf_dsv4.testing.release import FP8_WEIGHTS

    plan = {}
    for name, param in model.named_parameters():
        if ".mlp.experts." in name and name.endswith(("gate_up_proj", "down_proj")):
            experts, rows, cols = param.shape
            plan[name] = ("fp4", (experts, rows, cols // 2), (experts, rows, cols // 32))
        elif FP8_WEIGHTS.search(hub_name(name)):
            rows, cols = param.shape
            plan[name] = ("fp8", (rows, cols), (math.ceil(rows / 128), math.ceil(cols / 128)))
    return plan


def build(config, targets: str, keep_quantized: bool) -> nn.Module:
    """The training model on meta, as the recipe makes it before sharding: bf16, activation checkpointing, the fused
    LM head, LoRA, sparse attention, and with `keep_quantized` the quantized-resident base (`shard_model`'s first
    step, `quantize_base`: autograd saves each weight as its bytes, also under activation checkpointing)."""
    from peft import get_peft_model
    from transformers import DeepseekV4ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from hf_dsv4 import dsv4_lora_config, enable_sparse_attention
    from hf_dsv4.sharding.quantized import quantize_base
    from hf_dsv4.sharding.streamed import reader_names

    with torch.device("meta"):  # a copy: enable_sparse_attention names its attention in the model's config
        model = DeepseekV4ForCausalLM._from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    model.config.use_cache = False
    plan = release_plan(model) if keep_quantized else None
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    add_fused_lm_head(model, outputs=TRL_OUTPUTS)
    model = get_peft_model(model, dsv4_lora_config(r=16, alpha=32, targets=targets))
    enable_sparse_attention(model)
    if plan:
        quantize_base(model, plan, reader_names(model))
    return model


def shard(model: nn.Module, mesh) -> None:
    """FSDP2 as `shard_model` lays it out (per decoder layer and dtype; routed-expert LoRA in the experts' dtype),
    with the policy `accelerate launch --mixed_precision bf16` gives through the project's plugin (`fp32_reduction`).
    `shard_model`'s other steps move weights (validation against rank 0, the fill): nothing to move here."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from hf_dsv4.sharding.layout import apply_fsdp
    from hf_dsv4.sharding.shard import align_parameter_adapter_dtypes
    from hf_dsv4.training.accelerate_plugin import fp32_reduction

    align_parameter_adapter_dtypes(model)
    policy = fp32_reduction(MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
    apply_fsdp(model, mesh, reshard_after_forward=True, mixed_precision=policy)


# ---------------------------------------------------------------------------------------------- the stand-in


def _balanced_experts(module: nn.Module, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (`DeepseekV4Experts.forward`) with balanced routing instead of the routed
    one: the same one-hot mask, then per expert the same gather, projections, gate, weighting and `index_add_`, on
    a fixed slice of tokens x top-k rows (which `nonzero` / `torch.where` would pick from the data)."""
    final = torch.zeros_like(hidden_states)
    experts, (tokens, top_k) = module.num_experts, top_k_index.shape
    with torch.no_grad():
        F.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)  # the loop's mask (its bytes)
    rows = torch.arange(tokens * top_k, device=hidden_states.device)
    bounds = [tokens * top_k * e // experts for e in range(experts + 1)]
    for expert in range(experts):
        picked = rows[bounds[expert] : bounds[expert + 1]]
        token_idx, top_k_pos = picked // top_k, picked % top_k
        current = module._apply_gate(F.linear(hidden_states[token_idx], module.gate_up_proj[expert]))
        current = F.linear(current, module.down_proj[expert]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


@contextlib.contextmanager
def balanced_per_expert(model: nn.Module) -> Iterator[int]:
    """Within: every quantized experts module computed per expert runs `_balanced_experts` (each expert's weight
    dequantized where the loop uses it, as in training); yields how many."""
    from torch.distributed.tensor import DTensor

    from hf_dsv4.sharding.quantized import quantized_modules, quantized_weights

    def per_expert(module: nn.Module) -> bool:
        weights = quantized_weights(module).values()
        return any((w.to_local() if isinstance(w, DTensor) else w).per_expert for w in weights)

    modules = [m for m in quantized_modules(model).values() if per_expert(m)]

    def forward(module: nn.Module):
        def run(hidden_states, top_k_index, top_k_weights):
            return _balanced_experts(module, hidden_states, top_k_index, top_k_weights)

        return run

    for module in modules:
        module.forward = forward(module)
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward


# ---------------------------------------------------------------------------------------------- one step


@contextlib.contextmanager
def layer_progress(model: nn.Module, desc: str) -> Iterator[None]:
    """A tqdm bar over the decoder layers' MoE calls: each layer's forward, then its recompute in backward (activation
    checkpointing calls the layer's forward function again, so hooks on the layer itself see only the first)."""
    from hf_dsv4.loading.units import decoder_layers

    layers = decoder_layers(model)
    bar = tqdm(total=2 * len(layers), desc=desc, unit="layer", file=sys.stderr, leave=False)

    def tick(*_: Any) -> None:  # a pre-hook's return value would replace the module's inputs
        bar.update()

    hooks = [layer.mlp.register_forward_pre_hook(tick) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


def optimizer_with_state(model: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW (the Trainer's default, `adamw_torch_fused`) on the trainable parameters, its state made by one
    step on zero gradients: the tracked step then is a steady-state one (its moments live from its start)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def train_step(model: nn.Module, tokens: int, vocab: int, desc: str, cp: tuple[int, int] = (0, 1)):
    """One training step (batch 1 x `tokens`, TRL's fused-head loss, backward, AdamW step) under the memory tracker;
    its peak bytes per device and category (`compat.tracker_peak`). With `cp` (this rank's index, the ranks that
    share a sequence), the sequence is `tokens` x ranks long and this rank trains its chunk of it, as the trainer
    hands it (`chunk_inputs`: labels shifted before the split, every rank's bounds)."""
    from hf_dsv4 import compat
    from hf_dsv4.modeling import chunk_inputs

    optimizer = optimizer_with_state(model)
    model.train()
    ids = torch.randint(3, vocab, (1, tokens * cp[1]))
    inputs = chunk_inputs({"input_ids": ids, "labels": ids}, *cp) if cp[1] > 1 else {"input_ids": ids, "labels": ids}
    tracker = compat.memory_tracker(model, optimizer)
    with tracker, layer_progress(model, desc):
        model(**inputs, fused_lm_head=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return compat.tracker_peak(tracker)


def summary(peak: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The device's total and its categories at the peak (GiB and bytes)."""
    (device, categories), *_ = peak.items()
    total = categories.pop("total")
    return {
        "peak_bytes_per_rank": total,
        "peak_gib_per_rank": total / GIB,
        "by_category": {k: v / GIB for k, v in sorted(categories.items()) if v},
    }


# ---------------------------------------------------------------------------------------------- trace and run


def context_parallel(model: nn.Module, ranks: int, cp: int) -> tuple[int, int]:
    """With `cp` > 1: the last `cp` ranks of the world share one sequence (`enable_context_parallel` over them; FSDP2
    still shards over all `ranks`, as accelerate's `dp_shard` x `cp` mesh does). This rank's (index, cp)."""
    if cp == 1:
        return 0, 1
    from hf_dsv4.modeling import enable_context_parallel

    group = None if cp == ranks else dist.new_group(list(range(ranks - cp, ranks)))
    enable_context_parallel(model, group)
    return dist.get_rank() - (ranks - cp), cp


def trace(config, ranks: int, tokens: int, targets: str, keep_quantized: bool, cp: int = 1) -> dict[str, Any]:
    """The step traced for one rank of `ranks` (fake process group, fake tensors): its peak, by category. Rank 0;
    with `cp` > 1 the last rank, whose chunk is the sequence's last (the longest halo and causal reach)."""
    from torch.distributed.device_mesh import init_device_mesh

    from hf_dsv4 import compat

    start = time.perf_counter()
    rank = 0 if cp == 1 else ranks - 1
    dist.init_process_group("fake", store=compat.fake_store(), rank=rank, world_size=ranks)
    try:
        mesh = init_device_mesh("cpu", (ranks,))  # before FakeTensorMode: the mesh holds real rank tensors
        model = build(config, targets, keep_quantized)
        shard(model, mesh)
        chunk = context_parallel(model, ranks, cp)
        with compat.fake_tensor_mode(), balanced_per_expert(model) as stand_ins:
            model.to_empty(device="cpu")
            peak = train_step(model, tokens, config.vocab_size, f"trace {ranks} ranks x {tokens} tokens", chunk)
    finally:
        dist.destroy_process_group()
    return {**summary(peak), "balanced_stand_ins": stand_ins, "trace_s": time.perf_counter() - start}


def _measure_rank(rank: int, ranks: int, store: str, config, tokens: int, targets: str, keep_quantized: bool,
                  cp: int, out: str) -> None:  # fmt: skip
    """One rank of the real run: the same model, layout and step on real CPU tensors over gloo."""
    from bench_flash_slice import randomize_hash_routes
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    model = build(config, targets, keep_quantized)
    shard(model, mesh)
    chunk = context_parallel(model, ranks, cp)
    model.to_empty(device="cpu")
    fill_random(model)
    randomize_hash_routes(model, seed=0)
    torch.manual_seed(0)  # one sequence for the ranks that share it
    peak = train_step(model, tokens, config.vocab_size, f"rank {rank}", chunk)
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary(peak)))
    dist.barrier()
    dist.destroy_process_group()


@torch.no_grad()
def fill_random(model: nn.Module) -> None:
    """Finite values for the real run (what it measures does not depend on them): small normal floats, FP8 codes of
    small magnitude and their scales one (ue8m0 127); the rotary tables as the model computes them."""
    from torch.distributed.tensor import DTensor

    from hf_dsv4.sharding.quantized import QuantizedWeight

    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if isinstance(local, QuantizedWeight):
            local.scale.fill_(127)
            local.codes.random_(0, 0x30)  # e4m3 and e2m1 pairs of magnitude < 2: finite
        elif local.is_floating_point():
            local.normal_(0.0, 0.02)
        else:
            local.zero_()
    for module in model.modules():
        if type(module).__name__ == "DeepseekV4RotaryEmbedding":
            fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers():
                module.get_buffer(name).copy_(buffer)


def measure(config, ranks: int, tokens: int, targets: str, keep_quantized: bool, cp: int = 1) -> dict[str, Any]:
    """The step measured in a real `ranks`-process gloo run: every rank's peak, by category."""
    import torch.multiprocessing as mp

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp, "store"))
        mp.spawn(_measure_rank, (ranks, store, config, tokens, targets, keep_quantized, cp, tmp), nprocs=ranks)
        results = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]
    worst = max(results, key=lambda r: r["peak_bytes_per_rank"])
    return {**worst, "per_rank_gib": [r["peak_gib_per_rank"] for r in results],
            "per_rank_by_category": [r["by_category"] for r in results], "run_s": time.perf_counter() - start}  # fmt: skip


# ---------------------------------------------------------------------------------------------- Flash


def trace_flash(args: argparse.Namespace, tokens: int) -> dict[str, Any]:
    """The Flash step traced with its first `--layers` decoder layers (43: all). With `--extrapolate` (an odd
    `--layers` K >= 3) also with K + 2 layers, and 43 extrapolated: past layer 2 the schedule repeats (HCA + top-k
    MoE, CSA + top-k MoE) and, with activation checkpointing, each further pair adds only what it keeps through the
    step (its shards, their gradients and AdamW state, its checkpointed input), so the peak of 43 is that of K + 2
    plus (41 - K) / 2 times the difference K -> K + 2, per category."""
    full = FLASH_LAYERS
    if not args.extrapolate:
        config = flash_config(args.layers)
        result = trace(config, args.ranks, tokens, args.targets, args.keep_quantized, args.cp)
        return {**result, "layers": config.num_hidden_layers}
    if args.layers < 3 or (full - args.layers) % 2 or args.layers + 2 > full:
        raise SystemExit(f"--extrapolate needs an odd --layers from 3 to {full - 2}, got {args.layers}")
    short, long = (trace(flash_config(n), args.ranks, tokens, args.targets, args.keep_quantized, args.cp)
                   for n in (args.layers, args.layers + 2))  # fmt: skip
    pairs = (full - args.layers - 2) // 2
    total = long["peak_bytes_per_rank"] + pairs * (long["peak_bytes_per_rank"] - short["peak_bytes_per_rank"])
    categories = {k: v + pairs * (v - short["by_category"].get(k, 0.0)) for k, v in long["by_category"].items()}
    return {"peak_bytes_per_rank": total, "peak_gib_per_rank": total / GIB, "by_category": categories,
            "balanced_stand_ins": long["balanced_stand_ins"], "trace_s": short["trace_s"] + long["trace_s"],
            "layers": full, "extrapolated_from_layers": [args.layers, args.layers + 2]}  # fmt: skip


def fit_tokens(args: argparse.Namespace, capacity_gb: float, probes: dict[int, int] | None = None) -> dict[str, Any]:
    """The longest multiple of 1024 tokens per rank whose traced peak fits `capacity_gb` (1e9 bytes) per GPU: a
    bracket over tokens (from `--tokens`) narrowed by false position (the peak is close to linear in tokens), each
    probe a trace; `probes` ({tokens: peak bytes}) carries the traces from one capacity to the next."""
    cap, step = capacity_gb * 1e9, 1024
    probes = {} if probes is None else probes

    def peak(tokens: int) -> int:
        if tokens not in probes:
            probes[tokens] = trace_flash(args, tokens)["peak_bytes_per_rank"]
            print(f"  {tokens:,} tokens: {probes[tokens] / 1e9:,.1f} GB", file=sys.stderr, flush=True)
        return probes[tokens]

    low, high = step, args.tokens
    if peak(low) > cap:
        return {"capacity_gb": capacity_gb, "tokens": 0, "probes": probes}
    while peak(high) <= cap:
        low, high = high, 2 * high
    while high - low > step:
        guess = low + (cap - peak(low)) * (high - low) / (peak(high) - peak(low))
        guess = min(max(int(guess) // step * step, low + step), high - step)
        low, high = (guess, high) if peak(guess) <= cap else (low, guess)
    return {"capacity_gb": capacity_gb, "tokens": low, "peak_gb": probes[low] / 1e9, "probes": probes}


# ---------------------------------------------------------------------------------------------- main


def check(args: argparse.Namespace) -> int:
    """`--tiny --check`: the trace on 2 fake ranks vs the real 2-rank gloo run; 0 if within 5%, else 1."""
    config = tiny_config(args.keep_quantized)
    traced = trace(config, CHECK_RANKS, args.tokens, args.targets, args.keep_quantized, args.cp)
    measured = measure(config, CHECK_RANKS, args.tokens, args.targets, args.keep_quantized, args.cp)
    error = traced["peak_bytes_per_rank"] / measured["peak_bytes_per_rank"] - 1
    result = {"traced": traced, "measured": measured, "relative_error": error, "within": abs(error) <= TOLERANCE}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"tiny DeepSeek-V4, {CHECK_RANKS} ranks x {args.tokens} tokens, LoRA '{args.targets}'"
              f"{', keep_quantized' if args.keep_quantized else ''}: traced {traced['peak_bytes_per_rank']:,} B, "
              f"measured {measured['peak_bytes_per_rank']:,} B (max over ranks), {error:+.2%}")  # fmt: skip
        for name, side in (("traced", traced), ("measured", measured)):
            print(f"  {name}: " + ", ".join(f"{k} {v * GIB / 2**20:,.2f} MiB" for k, v in side["by_category"].items()))
    return 0 if result["within"] else 1


def describe(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """One line saying what was traced, how, and how long it took."""
    base = "keep_quantized (FP8 / FP4 + scales)" if args.keep_quantized else "dequantized bf16"
    how = (f"traced with {result['layers']} layers" if "extrapolated_from_layers" not in result else
           "extrapolated from traces of {} and {} layers".format(*result["extrapolated_from_layers"]))  # fmt: skip
    stand_in = (f"; {result['balanced_stand_ins']} per-expert loops on balanced routing (stand-in)"
                if result["balanced_stand_ins"] else "")  # fmt: skip
    model = "the tiny DeepSeek-V4" if args.tiny else "DeepSeek-V4-Flash"
    if args.cp > 1:
        model += (
            f", one sequence of {args.tokens * args.cp:,} tokens split over {args.cp} of the ranks (context parallel)"
        )
    return (f"{model}, {args.ranks} ranks x {args.tokens:,} tokens, LoRA '{args.targets}' r=16, {base}, "
            f"sparse attention, activation checkpointing, FSDP2 bf16 / fp32 reduction, fused AdamW; {how}"
            f"{stand_in}; {result['trace_s']:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8, help="GPUs the step is sharded over (fake ranks)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (batch 1)")
    parser.add_argument(
        "--cp",
        type=int,
        default=1,
        help="context parallelism: the last CP ranks share one sequence of --tokens x CP tokens (enable_context_"
        "parallel), each training its chunk; FSDP2 still shards over all --ranks. The last rank is traced",
    )
    parser.add_argument("--targets", default="all", choices=["attention", "attention+shared", "all"],
                        help="LoRA preset (hf_dsv4.training.lora)")  # fmt: skip
    parser.add_argument("--keep-quantized", action="store_true", help="the quantized-resident base (FP8 / FP4)")
    parser.add_argument("--layers", type=int, default=FLASH_LAYERS, help="trace Flash's first N decoder layers")
    parser.add_argument(
        "--extrapolate",
        action="store_true",
        help="with an odd --layers K >= 3: trace K and K + 2 layers and extrapolate to all 43 (the schedule "
        "repeats past layer 2); much faster than tracing 43",
    )
    parser.add_argument(
        "--fit",
        type=float,
        nargs="*",
        metavar="GB",
        help="print the longest multiple of 1024 tokens whose peak fits each capacity (GB per GPU)",
    )
    parser.add_argument("--json", action="store_true", help="print one line of JSON")
    parser.add_argument("--tiny", action="store_true", help="the tiny DeepSeek-V4 of the tests instead of Flash")
    parser.add_argument("--check", action="store_true", help="with --tiny: trace vs a real 2-rank gloo run, 5%%")
    args = parser.parse_args()
    if args.cp < 1 or args.ranks % args.cp or (args.check and args.cp not in (1, CHECK_RANKS)):
        parser.error(f"--cp must divide --ranks ({args.ranks}); with --check, 1 or {CHECK_RANKS}")
    if args.check:
        if not args.tiny:
            parser.error("--check runs the real step beside the trace: only with --tiny")
        raise SystemExit(check(args))
    if args.fit:
        probes: dict[int, int] = {}
        fits = [fit_tokens(args, capacity, probes) for capacity in args.fit]
        print(json.dumps(fits) if args.json else "\n".join(
            f"{f['capacity_gb']:g} GB per GPU: {f['tokens']:,} tokens" for f in fits))  # fmt: skip
        return
    if args.tiny:
        config = tiny_config(args.keep_quantized)
        result = trace(config, args.ranks, args.tokens, args.targets, args.keep_quantized, args.cp)
        result["layers"] = config.num_hidden_layers
    else:
        result = trace_flash(args, args.tokens)
    if args.json:
        print(json.dumps({"ranks": args.ranks, "tokens": args.tokens, "cp": args.cp, "targets": args.targets,
                          "keep_quantized": args.keep_quantized, **result}))  # fmt: skip
        return
    print(describe(args, result))
    print(f"peak per rank: {result['peak_gib_per_rank']:,.3f} GiB ({result['peak_bytes_per_rank'] / 1e9:,.2f} GB)")
    for category, gib in sorted(result["by_category"].items(), key=lambda kv: -kv[1]):
        print(f"  {category:16s} {gib:10,.3f} GiB")


if __name__ == "__main__":
    main()
