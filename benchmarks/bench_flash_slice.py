"""LoRA fine-tuning throughput and peak GPU memory on a 2-layer, full-width DeepSeek-V4-Flash slice (random weights).

    python benchmarks/bench_flash_slice.py --dry-run                      # parameter counts and sizes, allocates nothing
    python benchmarks/bench_flash_slice.py                                # 1 GPU: seq 4096 x batch 1, 2 + 10 steps
    python benchmarks/bench_flash_slice.py --activation-checkpointing --json /tmp/flash_slice.json
    torchrun --nproc_per_node 8 benchmarks/bench_flash_slice.py --fsdp    # FSDP2 over 8 GPUs (hf_dsv4.shard_model)
    accelerate launch --config_file accelerate_configs/fsdp2_1node_8gpu.yaml --num_processes 8 \\
        benchmarks/bench_flash_slice.py --fsdp
    python benchmarks/bench_flash_slice.py --tiny --device cpu --steps 2  # CPU check of the script itself
    torchrun --nproc_per_node 8 benchmarks/bench_flash_slice.py --fsdp --keep-quantized /data/flash_slice_release
        # LoRA over the FP8 / FP4 release encodings kept in the shards (a one-layer Flash slice, written there if
        # missing by `_common.build_flash_release`; with --tiny the tiny release-layout model)
    torchrun --nproc_per_node 2 benchmarks/bench_flash_slice.py --tiny --device cpu --fsdp --steps 2   # gloo

The model is the real V4-Flash configuration (hidden 4096, 64 heads of head_dim 512, q_lora_rank 1024, grouped output
projection 8 x 1024, 256 routed experts of 2048 + 1 shared, top-6, sqrt-softplus routing, hc_mult 4, vocab 129,280,
YaRN x16 on the compressed branches) cut to `num_hidden_layers=2`. V4-Flash's own first two layers are both
sliding-window attention with hash-routed MoE (its first 3 MoE layers are hash-routed; layers 2.. alternate CSA/HCA),
so the default slice is layer 0 as in V4-Flash (`sliding_attention` + `hash_moe`) and layer 1 a CSA layer with top-k
routing as in V4-Flash's layers 3.. (`compressed_sparse_attention` + `moe`): every code path but HCA, which
`--layer-types sliding_attention,heavily_compressed_attention` measures instead. `DeepseekV4Config`'s defaults are
V4-Flash's dimensions, but its default `layer_types` is V4-Pro's schedule (HCA first) and it has no YaRN, so both are
set here explicitly (as are the dimensions, so a change of defaults cannot change the benchmark).

The model is built directly on the device in bf16 (`torch.device` context, transformers' random init, fixed seed;
the hash-routing table `tid2eid` is set to random distinct experts per token id, since its init is all zeros). Under
`--fsdp` rank 0 builds it on its GPU, the other ranks on meta, LoRA is added on every rank and `hf_dsv4.shard_model`
shards it (bf16 params, fp32 reduction) and broadcasts rank 0's weights. LoRA: `dsv4_lora_config(r=16, alpha=32,
targets=--targets)`; the adapter weights are fp32 beside the bf16 base (peft computes the LoRA branch in fp32 in a
single process; under FSDP2 the bf16 MixedPrecisionPolicy computes it in bf16 with fp32 master weights), so no autocast
is used. AdamW on the trainable parameters, random token batches, loss = next-token cross-entropy on the inputs.

Measured: tokens/s over the timed steps (after the warmup steps; `torch.cuda.synchronize` around each step; global =
all ranks' tokens / the slowest rank's time), the logical peak of live tensors over one more step after the timed ones
(torch's memory tracker, `benchmarks/_memory.py`; its dispatch hook is not in the timed steps; max over ranks), peak
memory over warmup + timed + tracked steps (`max_memory_allocated` / `max_memory_reserved`, max over
ranks; on CPU the process peak RSS under default glibc, which includes freed memory glibc keeps), parameter counts
(before sharding) and the MoE
routing imbalance over the timed steps from `hf_dsv4.DSV4Callback` (mean over MoE layers of max/mean tokens per
expert; random weights and tokens, so it says that the metric works, not how real data routes). A CUDA OOM prints the
memory stats and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# FLASH, FLASH_LAYERS, FLASH_SCHEDULE: flash_rehearsal.py imports them from here too
from _common import CSA, FLASH, FLASH_LAYERS, FLASH_SCHEDULE, SLIDING, build_flash_release, machine  # noqa: E402

# --tiny: the same structure, small enough for a CPU (hidden 256, 8 experts, vocab 4096; seq-len 256).
TINY = dict(vocab_size=4096, hidden_size=256, moe_intermediate_size=128, num_attention_heads=4, head_dim=64,
            qk_rope_head_dim=16, q_lora_rank=64, num_experts_per_tok=2, n_routed_experts=8, o_groups=2,
            o_lora_rank=64, index_n_heads=4, index_head_dim=32, index_topk=16)  # fmt: skip
OOM_EXIT = 3
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft 0.21 asks transformers 5


def log(*parts) -> None:
    """Progress on the main process, flushed (the GPU session reads the output as it comes)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*parts, flush=True)


def slice_config(args: argparse.Namespace, num_layers: int | None = None):
    from transformers import DeepseekV4Config

    values = {**FLASH, **(TINY if args.tiny else {})}
    if num_layers is None:
        layer_types, mlp_types = args.layer_types.split(","), args.mlp_layer_types.split(",")
        values.update(num_hidden_layers=len(layer_types), layer_types=layer_types, mlp_layer_types=mlp_types)
    else:
        values.update(num_hidden_layers=num_layers, **FLASH_SCHEDULE)
    return DeepseekV4Config(**values)


def build_model(config, device: torch.device | str, dtype: torch.dtype, seed: int, experts: str | None = None):
    """`DeepseekV4ForCausalLM` built on `device` with transformers' random init (on "meta": shapes only)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    kwargs = {"dtype": dtype} if experts is None else {"dtype": dtype, "experts_implementation": experts}
    with torch.device(device):
        model = DeepseekV4ForCausalLM._from_config(config, **kwargs)
    if str(device) != "meta":
        randomize_hash_routes(model, seed)
    return model


@torch.no_grad()
def randomize_hash_routes(model, seed: int) -> None:
    """`tid2eid` as in a checkpoint: `top_k` distinct random experts per token id (the init is all zeros, which would
    send every token of a hash layer to expert 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):
            n_experts = model.config.n_routed_experts
            order = torch.rand(buffer.shape[0], n_experts, generator=gen).argsort(dim=-1)
            buffer.copy_(order[:, : buffer.shape[1]].to(buffer.device))


def load_quantized(args: argparse.Namespace, dtype: torch.dtype):
    """The release-layout checkpoint `args.keep_quantized` (written by rank 0 when missing) streamed with its FP8 / FP4
    weights kept quantized (`memory_efficient_init(stream=True, keep_quantized=...)`): on meta until `shard_model`."""
    from transformers import AutoModelForCausalLM

    from hf_dsv4 import memory_efficient_init

    path = args.keep_quantized
    if dist.get_rank() == 0 and not (path / "model.safetensors.index.json").exists():
        log(f"writing a release-layout {'tiny model' if args.tiny else 'one-layer V4-Flash slice'} to {path} ...")
        if args.tiny:
            from hf_dsv4.testing import build_release_dsv4

            build_release_dsv4(path)
        else:
            build_flash_release(path)
    dist.barrier()
    kwargs = {} if args.experts_implementation is None else {"experts_implementation": args.experts_implementation}
    with memory_efficient_init(stream=True, keep_quantized=args.quantized_experts):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def add_lora(model, args: argparse.Namespace):
    from peft import get_peft_model

    from hf_dsv4 import dsv4_lora_config

    if args.activation_checkpointing:
        # = gradient_checkpointing_enable, under its transformers 5 name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return get_peft_model(model, dsv4_lora_config(r=16, alpha=32, targets=args.targets))


def parameter_counts(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---------------------------------------------------------------------------------------------- dry run

_PARTS = [  # (label, substrings of a parameter name), first match wins
    ("routed experts", (".mlp.experts.",)),
    ("shared expert", (".shared_experts.",)),
    ("routers", (".mlp.gate.",)),
    ("CSA/HCA compressor + indexer", (".compressor.",)),
    ("attention projections", (".self_attn.",)),
    ("embeddings + lm_head", ("embed_tokens", "lm_head")),
    ("norms, hyper-connections, sinks", ("",)),
]


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB"


def dry_run(args: argparse.Namespace) -> None:
    """Build the slice (and the whole V4-Flash for scale) on meta, count, print; nothing is allocated."""
    config = slice_config(args)
    base = build_model(config, "meta", torch.bfloat16, args.seed)
    groups: dict[str, list[int]] = {label: [0, 0] for label, _ in _PARTS}
    for name, param in base.named_parameters():
        label = next(label for label, keys in _PARTS if any(k in name for k in keys))
        groups[label][0] += param.numel()
        groups[label][1] += param.numel() * param.element_size()
    total = sum(n for n, _ in groups.values())
    stored = sum(b for _, b in groups.values())
    model = add_lora(base, args)
    _, trainable = parameter_counts(model)
    full = build_model(slice_config(args, FLASH_LAYERS), "meta", torch.bfloat16, args.seed)
    full_total = sum(p.numel() for p in full.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())

    name = "tiny" if args.tiny else "V4-Flash"
    print(f"{name} slice: {config.num_hidden_layers} layers {config.layer_types} / {config.mlp_layer_types}, "
          f"hidden {config.hidden_size}, {config.n_routed_experts} routed experts + {config.n_shared_experts} shared, "
          f"head_dim {config.head_dim}, vocab {config.vocab_size:,}; LoRA r=16 on '{args.targets}'\n")  # fmt: skip
    print("| part | parameters | stored (bf16, fp32-kept modules in fp32) |")
    print("| --- | ---: | ---: |")
    for label, (count, n_bytes) in groups.items():
        print(f"| {label} | {count:,} | {_gb(n_bytes)} |")
    print(f"| **total, 2-layer slice** | **{total:,}** | **{_gb(stored)}** (all-bf16: {_gb(2 * total)}) |")
    print(f"| LoRA adapter (trainable, fp32) | {trainable:,} | {_gb(4 * trainable)} |")
    print(f"| whole {name}, {FLASH_LAYERS} layers, for scale | {full_total:,} | {_gb(full_bytes)} |")
    state = 4 * trainable * 3  # fp32 gradients + AdamW exp_avg and exp_avg_sq
    print(f"\nsingle GPU before activations: weights {_gb(stored)} + adapter {_gb(4 * trainable)} + adapter grads and "
          f"AdamW state {_gb(state)} = {_gb(stored + 4 * trainable + state)}; under FSDP2 divide by the GPU count "
          "(rank 0 holds the whole slice once more while it broadcasts)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) on a GPU; (peak RSS, nan) on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), float(torch.cuda.max_memory_reserved(device))
    from hf_dsv4.training.callback import process_peak_memory_bytes

    return float(process_peak_memory_bytes()), float("nan")


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def train(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    """Build, add LoRA, (shard), train; fills `result` as it goes (what is there is printed on an OOM)."""
    from _memory import live_tensors
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from hf_dsv4 import DSV4Callback, shard_model
    from hf_dsv4.sharding import align_parameter_adapter_dtypes

    rank = dist.get_rank() if args.fsdp else 0
    world = dist.get_world_size() if args.fsdp else 1
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if args.keep_quantized:
        model = load_quantized(args, dtype)
        config = model.config
        result["layer_types"], result["mlp_layer_types"] = (
            ",".join(config.layer_types),
            ",".join(config.mlp_layer_types),
        )
    else:
        config = slice_config(args)
        log(f"building the {'tiny' if args.tiny else 'V4-Flash'} slice on {device if rank == 0 else 'meta'} ...")
        model = build_model(config, device if rank == 0 else "meta", dtype, args.seed, args.experts_implementation)
    model = add_lora(model, args)
    result["total_params"], result["trainable_params"] = parameter_counts(model)
    result["experts_implementation"] = model.config._experts_implementation
    if args.keep_quantized:  # FP8 / FP4 kept in the shards: experts per quantized expert (eager loop) or one stack
        result["mode"] += f" + keep_quantized ({args.quantized_experts})"
        if args.quantized_experts == "per_expert":
            result["experts_implementation"] = "eager, one quantized expert at a time"
    result["build_s"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        result["weights_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
    log(f"built in {result['build_s']} s: {result['total_params']:,} parameters, {result['trainable_params']:,} "
        f"trainable; experts: {result['experts_implementation']}")  # fmt: skip
    if args.fsdp:
        start = time.perf_counter()
        align_parameter_adapter_dtypes(model)  # routed-expert adapters (--targets all) train in the base dtype
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_model(model, mixed_precision=policy)
        result["shard_s"] = round(time.perf_counter() - start, 2)
        log(f"sharded over {world} ranks in {result['shard_s']} s")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    callback = DSV4Callback(save_adapter=False)
    callback.attach(model)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    vocab = config.vocab_size

    def step(index: int, timed: bool) -> float:
        ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
        _sync(device)
        begin = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if index == 1 and not timed:  # a LoRA weight without a gradient would train nothing: say so
            result["trainable_without_grad"] = sum(p.grad is None for p in trainable)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds = time.perf_counter() - begin
        kind = "step" if timed else "warmup"
        log(f"{kind} {index}: {seconds:.2f} s, loss {loss.item():.4f}, {args.batch_size * args.seq_len * world / seconds:,.0f} tokens/s")  # fmt: skip
        return seconds

    if device.type == "cuda":
        result["build_peak_gb"] = round(_max_over_ranks([torch.cuda.max_memory_allocated(device)], device)[0] / 1e9, 3)
        torch.cuda.reset_peak_memory_stats(device)  # the table's peak: warmup + timed steps
    for index in range(1, args.warmup + 1):
        step(index, timed=False)
    callback.collect(step=0)  # resets the routing counts: the imbalance below is over the timed steps
    if args.fsdp:
        dist.barrier()
    times = [step(index, timed=True) for index in range(1, args.steps + 1)]
    elapsed, step_median = _max_over_ranks([sum(times), statistics.median(times)], device)
    routing = callback.collect(step=1)
    callback.detach()
    # one more step under the tracker, last: torch's FSDP2 tracker leaves its forward hooks on a module group of
    # several modules when it exits, so no step may follow it
    with live_tensors(model, optimizer, device=str(device)) as live:
        step(args.warmup + 1, timed=False)
    result["logical_peak_gb"] = round(_max_over_ranks([live.peak], device)[0] / 1e9, 3)
    allocated, reserved = _max_over_ranks(list(_peak_bytes(device)), device)
    result.update(
        tokens_per_s=round(world * args.batch_size * args.seq_len * args.steps / elapsed, 1),
        step_s_median=round(step_median, 3),
        peak_allocated_gb=round(allocated / 1e9, 3),
        peak_reserved_gb=None if reserved != reserved else round(reserved / 1e9, 3),
        moe_imbalance=routing.get("moe_imbalance"),
        moe_max_expert_share=routing.get("moe_max_expert_share"),
    )


def report(result: dict, args: argparse.Namespace) -> None:
    cuda = result["device_type"] == "cuda"
    peak = "-" if result.get("peak_allocated_gb") is None else f"{result['peak_allocated_gb']:.2f}"
    peak += "" if cuda or peak == "-" else " (RSS)"
    reserved = result.get("peak_reserved_gb")
    imbalance = result.get("moe_imbalance")
    print(f"\nmachine: {result['machine']}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {result['layer_types']} / {result['mlp_layer_types']}, "
          f"LoRA r=16 alpha=32 on '{args.targets}', {args.dtype} weights, experts: {result.get('experts_implementation')}, "
          f"{args.warmup} warmup + {args.steps} timed steps, median step {result.get('step_s_median')} s, "
          f"build {result.get('build_s')} s, shard {result.get('shard_s', '-')} s, weights {result.get('weights_gb', '-')} GB "
          f"(rank 0), peak while building/sharding {result.get('build_peak_gb', '-')} GB, trainable tensors without a "
        f"gradient {result.get('trainable_without_grad', '-')}\n")  # fmt: skip
    print("| mode | device | GPUs | seq len | batch | total params | trainable params | tokens/s | logical peak GB "
          "| peak allocated GB | peak reserved GB | moe_imbalance |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {result['mode']} | {result['device']} | {result['gpus']} | {args.seq_len} | {args.batch_size} "
          f"| {result['total_params']:,} | {result['trainable_params']:,} | {result.get('tokens_per_s', '-')} "
          f"| {result.get('logical_peak_gb', '-')} | {peak} "
          f"| {'-' if reserved is None else f'{reserved:.2f}'} | {'-' if imbalance is None else imbalance} |", flush=True)  # fmt: skip


def print_oom(exc: BaseException, device: torch.device, result: dict, args: argparse.Namespace) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    free, total = torch.cuda.mem_get_info(device)
    print(f"\nrank {rank}: OUT OF MEMORY on {torch.cuda.get_device_name(device)} "
          f"({'FSDP2' if args.fsdp else '1 process'}, seq len {args.seq_len}, batch {args.batch_size}, "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}): "
          f"{str(exc).splitlines()[0][:300]}", flush=True)  # fmt: skip
    print(f"rank {rank}: allocated {torch.cuda.memory_allocated(device) / 1e9:.2f} GB, reserved "
          f"{torch.cuda.memory_reserved(device) / 1e9:.2f} GB, peak allocated {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB, "
          f"peak reserved {torch.cuda.max_memory_reserved(device) / 1e9:.2f} GB, free {free / 1e9:.2f} of {total / 1e9:.2f} GB; "
          f"so far: {json.dumps(result)}", flush=True)  # fmt: skip
    print(f"rank {rank}: the 2-layer V4-Flash slice does NOT fit this way; try --activation-checkpointing, a smaller "
          "--seq-len, or --fsdp over more GPUs", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the ranks of torchrun / accelerate launch")
    parser.add_argument("--tiny", action="store_true", help="hidden 256, 8 experts, vocab 4096, seq-len 256 (CPU)")
    parser.add_argument("--dry-run", action="store_true", help="count parameters on meta, print, exit")
    parser.add_argument("--seq-len", type=int, default=None, help="default 4096 (256 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--targets", default="attention+shared", help="hf_dsv4 LoRA preset: attention | attention+shared | all")  # fmt: skip
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--layer-types", default=f"{SLIDING},{CSA}")
    parser.add_argument("--mlp-layer-types", default="hash_moe,moe")
    parser.add_argument("--experts-implementation", default=None, help="transformers' (default: grouped_mm if usable)")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here (rank 0)")
    parser.add_argument("--keep-quantized", type=Path, default=None, metavar="CKPT",
                        help="LoRA over this release-layout checkpoint with its FP8 / FP4 weights kept quantized in "
                        "the shards (written there when missing; needs --fsdp)")  # fmt: skip
    parser.add_argument("--quantized-experts", default="per_expert", choices=["per_expert", "stack"])
    args = parser.parse_args()
    if args.keep_quantized and not args.fsdp:
        parser.error("--keep-quantized shards the model: run with --fsdp under torchrun (one process is fine)")
    args.seq_len = args.seq_len or (256 if args.tiny else 4096)

    if args.dry_run:
        return dry_run(args)
    device = torch.device(args.device)
    if args.fsdp:
        if "WORLD_SIZE" not in os.environ:
            parser.error("--fsdp runs under torchrun or accelerate launch (no WORLD_SIZE in the environment)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    elif device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    world = dist.get_world_size() if args.fsdp else 1

    result = {
        "mode": (f"FSDP2 x {world}" if args.fsdp else "1 process") + (" + AC" if args.activation_checkpointing else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type,
        "gpus": world if device.type == "cuda" else f"0 ({world} CPU process{'es' if world > 1 else ''})",
        "machine": machine() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "targets": args.targets,
        "activation_checkpointing": args.activation_checkpointing,
        "tiny": args.tiny,
        "layer_types": args.layer_types,
        "mlp_layer_types": args.mlp_layer_types,
        "keep_quantized": None if args.keep_quantized is None else args.quantized_experts,
    }
    try:
        train(args, device, result)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if device.type != "cuda" or "out of memory" not in str(exc).lower():  # also cuBLAS/NCCL allocation failures
            raise
        print_oom(exc, device, result, args)
        if args.json:
            rank = dist.get_rank() if args.fsdp else 0
            path = args.json if rank == 0 else args.json.with_suffix(f".rank{rank}.json")
            path.write_text(json.dumps({**result, "error": f"CUDA out of memory on rank {rank}"}, indent=1))
        os._exit(OOM_EXIT)  # no collective teardown: the other ranks may be waiting in one (torchrun stops them)
    if not args.fsdp or dist.get_rank() == 0:
        report(result, args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}", flush=True)
    if args.fsdp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
