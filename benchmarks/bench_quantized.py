"""LoRA over a quantized-resident base vs over the dequantized one: peak memory per rank and step time, in one run.

    python benchmarks/bench_quantized.py                      # 2 CPU ranks, release-layout checkpoint (0.5 GB)
    python benchmarks/bench_quantized.py --layout flash --ranks 1 --modes qd --seq-len 256   # a full-width Flash layer
    python benchmarks/bench_quantized.py --projection         # Flash LoRA on 8 x 80 GB / 8 x 141 GB, computed
    torchrun-free on GPUs: python benchmarks/bench_quantized.py --backend nccl --ranks 8 --layout flash

Every mode loads the same release-layout checkpoint streamed into FSDP2 shards (`memory_efficient_init(stream=True)`
+ `shard_model`), adds the same LoRA adapter (`dsv4_lora_config(r=16, alpha=32, targets=--targets)`) and trains
1 + `--steps` + 1 AdamW steps on random tokens (batch 1 x `--seq-len`):

(q) keep_quantized, experts per expert (the default): FP8 / FP4 bytes + ue8m0 scales in the shards, each weight
    dequantized in its module's forward and again in backward, routed experts one at a time;
(s) keep_quantized, experts as one stack per layer (`quantized_experts="stack"`, the model's experts implementation);
(d) the dequantized base (transformers dequantizes the checkpoint to `--dtype` while it streams): the stock weights;
(e) as (d) with transformers' eager experts loop (what (q) computes), the like-for-like reference of (q).

Per rank (`benchmarks/_memory.py`): the training peak, two ways: the logical peak of live tensors over a last step
run under torch's FSDP2 memory tracker (`hf_dsv4.compat.memory_tracker(model, optimizer)`: shards, unsharded
parameters, adapter, gradients, AdamW state, activations and transients; what a GPU would hold) and, beside it, the
peak RSS rise from just before loading over the whole run (VmHWM, under default glibc: it includes freed memory glibc
keeps; on CUDA the peak allocated GPU memory); the peak RSS rise over loading; the bytes of the rank's shards; the
load wall time and the median time of the `--steps` untracked steps after the first (which creates AdamW's state;
the tracker's dispatch hook slows the step it watches, so that one is not timed). `--layout release` is
`bench_load.py`'s release checkpoint (8 layers, hidden 1024, 16 experts: 0.5 GB on disk, 1 GB in bf16);
`--layout flash` the full-width DeepSeek-V4-Flash layer of `_common.build_flash_release` (5.4 GB on disk, 15.3 GB in bf16). A
mode that does not fit is reported with its error, not hidden.

The RSS of the quantized modes depends on glibc: by default it raises its mmap threshold each time a large block is
freed, so the per-module dequantization temporaries (freed at once) are afterwards carved from the heap and kept
there; the logical peak does not depend on the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import build_checkpoint, machine  # noqa: E402
from _memory import MB, live_tensors, reset_rss_peak, rss_rise_mb  # noqa: E402
from bench_load import collect_ranks  # noqa: E402

MODES = {"q": "keep_quantized, experts per expert", "s": "keep_quantized, experts as one stack",
         "d": "dequantized base (stock weights)", "e": "(d) with transformers' eager experts loop"}  # fmt: skip
KEEP = {"q": "per_expert", "s": "stack", "d": False, "e": False}


# ---------------------------------------------------------------------------------------------- one rank


def _peak_mb(device, baseline_kb: int) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return rss_rise_mb(baseline_kb)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from hf_dsv4 import memory_efficient_init, shard_model
    from hf_dsv4.distributed import local_device
    from hf_dsv4.sharding.quantized import QuantizedWeight
    from hf_dsv4.training.lora import dsv4_lora_config

    dist.init_process_group(args.backend)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = local_device()
    dtype = getattr(torch, args.dtype)
    budget = int(args.read_budget_mb * 2**20) or None
    result: dict = {"rank": dist.get_rank(), "error": None}
    dist.barrier()
    baseline = reset_rss_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        with memory_efficient_init(stream=True, keep_quantized=KEEP[args.worker], read_budget=budget):
            extra = {"experts_implementation": "eager"} if args.worker == "e" else {}
            model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype, **extra)
        model = get_peft_model(model, dsv4_lora_config(r=16, alpha=32, targets=args.targets))
        shard_model(model)
        dist.barrier()
        result["load_s"] = time.perf_counter() - start
        result["load_peak_mb"] = _peak_mb(device, baseline)
        local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        parts = [t for w in local for t in ((w.codes, w.scale) if isinstance(w, QuantizedWeight) else (w,))]
        result["shard_mb"] = sum(t.numel() * t.element_size() for t in parts) / MB  # a quantized weight: its bytes
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        generator = torch.Generator().manual_seed(dist.get_rank())
        model.train()

        def step() -> float:
            ids = torch.randint(3, model.config.vocab_size, (1, args.seq_len), generator=generator).to(device)
            tick = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - tick

        times = [step() for _ in range(1 + args.steps)][1:]  # the first creates AdamW's state: not timed
        result["step_s"] = statistics.median(times) if times else None
        # one more step under the tracker, last: torch's FSDP2 tracker leaves its forward hooks on a module group of
        # several modules when it exits, so no step may follow it
        with live_tensors(model, optimizer, device=str(device)) as live:
            step()
        result["live_mb"] = live.peak / MB
        result["live_by_category_mb"] = {k: v / MB for k, v in live.by_category.items()}
        result["peak_mb"] = _peak_mb(device, baseline)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    if result["error"] is None:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver


def run_mode(mode: str, args: argparse.Namespace, port: int) -> list[dict]:
    out = args.out / mode
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.json"):
        stale.unlink()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(args.ranks),
           "LOCAL_WORLD_SIZE": str(args.ranks), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    forwarded = ["--ckpt", str(args.ckpt), "--out", str(out), "--backend", args.backend, "--dtype", args.dtype,
                 "--targets", args.targets, "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                 "--read_budget_mb", str(args.read_budget_mb)]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, *forwarded],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=open(out / f"rank{r}.log", "w"),  # noqa: SIM115
        )
        for r in range(args.ranks)
    ]
    return collect_ranks(procs, out, args.timeout)


def _cell(values: list, fmt: str) -> str:
    return "/".join("—" if v is None else format(v, fmt) for v in values)


def table(results: dict[str, list[dict]], tokens: int, device: str = "cpu") -> None:
    other = "RSS" if device == "cpu" else "allocated"
    print(f"| mode | run peak MB/rank | vs (d) | run peak {other} MB/rank | {other} vs (d) | load peak {other} MB/rank | "
          "shards MB/rank | load s | step s | tokens/s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference = results.get("d") or results.get("e")
    for mode, ranks in results.items():
        errors = [r["error"] for r in ranks if r.get("error")]
        if errors:
            print(f"| ({mode}) {MODES[mode]} | failed: {errors[0]} | | | | | | | | |")
            continue
        ratios = {field: "—" for field in ("live_mb", "peak_mb")}
        if reference and not any(r.get("error") for r in reference):
            for field in ratios:
                ratios[field] = f"{max(r[field] for r in ranks) / max(r[field] for r in reference):.2f}x"
        print(f"| ({mode}) {MODES[mode]} | {_cell([r['live_mb'] for r in ranks], ',.0f')} | {ratios['live_mb']} | "
              f"{_cell([r['peak_mb'] for r in ranks], ',.0f')} | {ratios['peak_mb']} | "
              f"{_cell([r['load_peak_mb'] for r in ranks], ',.0f')} | {_cell([r['shard_mb'] for r in ranks], ',.0f')} | "
              f"{max(r['load_s'] for r in ranks):.2f} | {max(r['step_s'] for r in ranks):.2f} | "
              f"{len(ranks) * tokens / max(r['step_s'] for r in ranks):,.0f} |")  # fmt: skip
    print(f"\nrun peak: the logical peak of live tensors over the tracked step (what a GPU would hold); "
          f"{other}: " + ("the process's peak RSS rise from just before loading, under default glibc (includes freed "
          "memory glibc keeps)" if other == "RSS" else "max_memory_allocated") + "; step s: the median of the "
          "untracked steps. Run peak by category, rank 0 (MB):")  # fmt: skip
    for mode, ranks in results.items():
        categories = ranks[0].get("live_by_category_mb") or {}
        print(f"  ({mode}) " + ", ".join(f"{k} {v:,.0f}" for k, v in categories.items() if round(v)))


def plot(results: dict[str, list[dict]], title: str, path: Path) -> None:
    """Per mode, rank 0's logical run peak stacked by category (parameters' shards, gathered layer, gradients,
    optimizer state, activations, temporaries) and the worst rank's RSS rise beside it; a failed mode is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6 + 1.4 * len(results), 4.2))
    by_mode = [ranks[0].get("live_by_category_mb") or {} for ranks in results.values()]
    # the tracker's categories, in its order, without its "total" and without those empty in every mode
    categories = [c for c in by_mode[0] if c != "total" and any(m.get(c, 0.0) > 0.5 for m in by_mode)]
    for i, ranks in enumerate(results.values()):
        if any(r.get("error") for r in ranks):
            ax.text(i, 0, "failed", ha="center", va="bottom", rotation=90)
            continue
        bottom = 0.0
        for j, category in enumerate(categories):
            value = by_mode[i].get(category, 0.0)
            ax.bar(i - 0.18, value, 0.34, bottom=bottom, color=f"C{j}", label=category if i == 0 else None)
            bottom += value
        ax.bar(i + 0.18, max(r["peak_mb"] for r in ranks), 0.34, color="0.7", hatch="//",
               label="RSS rise (worst rank)" if i == 0 else None)  # fmt: skip
    short = {"q": "quantized,\nper expert", "s": "quantized,\nstack", "d": "dequantized", "e": "dequantized,\neager"}
    ax.set_xticks(range(len(results)), [f"({mode}) {short[mode]}" for mode in results], fontsize=8)
    ax.set(ylabel="MB per rank over a training step")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="logical peak, rank 0", title_fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------------------------- projection


def projection_rows(targets: str = "all", seq: int = 4096) -> tuple[list[tuple[str, float, float]], int, int, Any]:
    """DeepSeek-V4-Flash LoRA per GPU on one node of 8, from the real config on meta (nothing is allocated): rows of
    (part, keep_quantized bytes, dequantized bf16 bytes) before one layer's recompute; the base's bytes as released
    and in bf16; the config."""
    import torch
    from _common import FLASH
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from hf_dsv4.testing.model import hub_name
    from hf_dsv4.testing.release import FP8_WEIGHTS
    from hf_dsv4.training.lora import dsv4_lora_config

    layers = 43
    sliding, csa, hca = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
    types = [sliding, sliding] + [csa if i % 2 == 0 else hca for i in range(layers - 2)]
    config = DeepseekV4Config(**FLASH, num_hidden_layers=layers, layer_types=types,
                              mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (layers - 3))  # fmt: skip
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config).to(torch.bfloat16)
    quantized = bf16 = 0
    largest_layer_q = largest_layer_bf16 = largest_module = 0
    per_layer: dict[int, list[int]] = {}
    for name, param in model.named_parameters():
        release = hub_name(name) if not name.endswith(("gate_up_proj", "down_proj")) or ".experts." not in name else ""
        n = param.numel()
        if ".experts." in name and name.endswith(("gate_up_proj", "down_proj")):
            q = n // 2 + n // 32  # FP4 codes two per byte + one ue8m0 byte per 32
        elif FP8_WEIGHTS.search(release):
            q = n + n // (128 * 128)
            largest_module = max(largest_module, n)
        else:
            q = 2 * n if param.dtype == torch.bfloat16 else 4 * n
        quantized += q
        bf16 += 2 * n if param.dtype == torch.bfloat16 else 4 * n
        if ".layers." in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            per_layer.setdefault(index, [0, 0])
            per_layer[index][0] += q
            per_layer[index][1] += 2 * n if param.dtype == torch.bfloat16 else 4 * n
    largest_layer_q = max(v[0] for v in per_layer.values())
    largest_layer_bf16 = max(v[1] for v in per_layer.values())
    experts = config.n_routed_experts * 3 * config.moe_intermediate_size * config.hidden_size  # one layer, elements
    one_expert = 3 * config.moe_intermediate_size * config.hidden_size
    adapter_cfg = dsv4_lora_config(r=16, alpha=32, targets=targets)
    lora = 0
    r = adapter_cfg.r
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            isinstance(module, torch.nn.Linear)
            and leaf in ("q_a_proj", "q_b_proj", "kv_proj", "o_b_proj")
            and ".self_attn." in name
            and ".compressor." not in name
        ):  # noqa: E501
            lora += r * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Linear) and ".shared_experts." in name and targets != "attention":
            lora += r * (module.in_features + module.out_features)
    if targets == "all":
        e, i, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        lora += layers * e * r * ((h + 2 * i) + (i + h))
    gpus = 8
    hc = config.hc_mult
    checkpoints = layers * seq * hc * config.hidden_size * 2  # activation checkpointing: each layer's input, bf16
    adapter_state = lora * (4 + 4 + 8)  # fp32 weights, grads, AdamW moments
    rows = [("frozen base, sharded (1/8)", quantized / gpus, bf16 / gpus),
            ("all-gather buffers (2 layers: current + prefetch)", 2 * largest_layer_q, 2 * largest_layer_bf16),
            # bf16 result + transformers' two fp32 temporaries, for the largest FP8 module and one expert
            ("dequantized in flight (largest module, one expert)", 10 * (largest_module + one_expert), 0),
            (f"LoRA '{targets}' r=16 + grads + AdamW, sharded", adapter_state / gpus, adapter_state / gpus),
            (f"activation checkpoints, seq {seq} (each layer's input)", checkpoints, checkpoints)]  # fmt: skip
    if targets == "all":  # peft folds the routed-expert update into the whole stack; per expert: one at a time
        rows.insert(3, ("routed-expert LoRA folded into the weights, in flight", 2 * one_expert, 2 * experts))
    return rows, quantized, bf16, config


def projection(args: argparse.Namespace) -> None:
    """Print the Flash projection table (`projection_rows`)."""
    rows, quantized, bf16, config = projection_rows(args.targets)
    layers, gpus = config.num_hidden_layers, 8
    experts = config.n_routed_experts * 3 * config.moe_intermediate_size * config.hidden_size  # one layer, elements
    total_q, total_b = sum(q for _, q, _ in rows), sum(b for _, _, b in rows)
    print(f"DeepSeek-V4-Flash ({layers} layers, {config.n_routed_experts} experts), LoRA on one node of {gpus} GPUs, "
          f"per GPU (GB; computed from the config on meta, not measured):\n")  # fmt: skip
    print("| part | keep_quantized | dequantized bf16 |")
    print("| --- | ---: | ---: |")
    for label, q, b in rows:
        print(f"| {label} | {q / 1e9:,.1f} | {b / 1e9:,.1f} |")
    print(f"| **subtotal before one layer's recompute** | **{total_q / 1e9:,.1f}** | **{total_b / 1e9:,.1f}** |")
    stack = 2 * experts * (2 if args.targets == "all" else 1)  # the stack, and peft's fold of it with an expert LoRA
    print(f"| 'stack' experts instead: a layer's experts in bf16 in flight | +{stack / 1e9:,.1f} | |")
    for name, memory in (("8 x 80 GB (H100)", 80e9), ("8 x 141 GB (H200)", 141e9)):
        left_q, left_b = memory - total_q, memory - total_b
        print(f"| left on {name} for one layer's recompute (attention scores, MoE) | {left_q / 1e9:,.1f} | "
              f"{left_b / 1e9:,.1f} |")  # fmt: skip
    print(f"\nwhole base: {quantized / 1e9:,.0f} GB as released (FP8 + FP4 + scales) vs {bf16 / 1e9:,.0f} GB in bf16; "
          "peers: NeMo AutoModel's Flash LoRA recipe 32 x H100; ms-swift 8 large-memory GPUs; axolotl 2 x B200 from "
          "a re-quantized NVFP4 checkpoint (~140 GB/GPU)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="release", choices=["release", "flash"])
    parser.add_argument("--ckpt", type=Path, default=None, help="default: /tmp/hf_dsv4_bench_<layout>")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--modes", default="qsd")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--targets", default="all", help="LoRA preset: attention | attention+shared | all")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after the 2 tracked ones")
    parser.add_argument("--read_budget_mb", type=float, default=0.0, help="streamed read budget (0: whole layers)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("/tmp/hf_dsv4_bench_quantized"))
    parser.add_argument("--projection", action="store_true", help="print the Flash projection table and exit")
    parser.add_argument("--plot", type=Path, default=None, help="draw each mode's peak by category into this PNG")
    parser.add_argument(
        "--replot", action="store_true", help="with --plot: draw the results saved in --out, run nothing"
    )
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.projection:
        projection(args)
        return
    args.ckpt = args.ckpt or Path(f"/tmp/hf_dsv4_bench_{args.layout}")
    if args.worker:
        worker(args)
        return
    title = (f"LoRA '{args.targets}', {args.layout}-layout checkpoint, {args.ranks} ranks, {args.dtype}, "
             f"1 x {args.seq_len} tokens")  # fmt: skip
    if args.replot:
        saved = {m: [json.loads(f.read_text()) for f in sorted((args.out / m).glob("rank*.json"))] for m in args.modes}
        plot(saved, title, args.plot)
        return
    size = build_checkpoint(args.ckpt, args.layout)
    print(f"machine: {machine()}\ncheckpoint: {args.ckpt} ({args.layout} layout, {size:,.0f} MB on disk), {args.ranks} "
          f"{args.backend} ranks, {args.dtype}, LoRA r=16 '{args.targets}', batch 1 x {args.seq_len}, "
          f"1 + {args.steps} timed + 1 tracked steps\n")  # fmt: skip
    import socket

    results = {}
    for mode in args.modes:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        results[mode] = run_mode(mode, args, port)
    table(results, args.seq_len, "cpu" if args.backend == "gloo" else "cuda")
    if args.plot:
        plot(results, title, args.plot)


if __name__ == "__main__":
    main()
