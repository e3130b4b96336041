"""Context parallelism (`enable_context_parallel`): per-rank peak memory of a LoRA training step vs the sequence length
with the sequence split over 1, 2 or 4 CPU ranks (gloo), and the bytes each of its collectives moves per layer.

    python benchmarks/bench_context_parallel.py                       # L = 4k, 8k, 16k; cp = 1, 2, 4
    python benchmarks/bench_context_parallel.py --lengths 8192 --cp 1 2 --json /tmp/cp.json

The model: `bench_packing.py`'s small DeepSeek-V4 (hidden 512, 8 heads of 64, 3 layers: sliding, CSA, HCA with
Flash's window of 128 and compression 4 / 128, the indexer's top 64; 8 routed experts, top-2), float32, LoRA "all"
(r 8), sparse attention, FSDP2 over the ranks (`shard_model`), decoder layers checkpointed (what the main job runs
for long sequences). One forward + backward of one sequence of L random tokens: each rank runs its chunk
(`chunk_bounds`). Per rank: the logical peak of live tensors over the step (FSDP2's tracker, `benchmarks/_memory.py`)
minus what was alive before it (the sharded model and inputs), the activation part of it (torch's "act" and "temp"
categories), and the wall time. The goal of the issue: cp-N activation memory per rank <= 1.2 / N of cp 1's.

The collectives of one layer under context parallelism, from the geometry (no run needed), for this model and for
DeepSeek-V4-Flash: the halo (an all-gather of every rank's last `halo` hidden states, its gradient an all-reduce of
the same), the compressed entries and the indexer keys (all-gathers of every rank's entries; the entries' gradient
an all-reduce).

Load balance (`--balance`, from DeepSeek-V4-Flash's config, no run): the training step's matmul FLOPs per rank with a
128k-token sequence split into 8 contiguous chunks. Everything but the attention costs the same per token; the
lightning indexer scores each query against every earlier CSA entry (t / 4 of them) and HCA attends to t / 128
entries, so later chunks cost more: the step waits for the last rank. The table says what a causal load balance
(e.g. each rank holding two mirrored half-chunks) would gain at most: max / mean - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import MB, live_tensors  # noqa: E402
from bench_packing import OVERRIDES, free_port  # noqa: E402

FLASH = dict(hidden=4096, head_dim=512, index_head_dim=128, window=128, csa=4, hca=128, bytes=2)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import DeepseekV4ForCausalLM

    from hf_dsv4 import dsv4_lora_config, enable_sparse_attention, shard_model
    from hf_dsv4.modeling import chunk_bounds, chunk_inputs, enable_context_parallel
    from hf_dsv4.testing.model import tiny_dsv4_config

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM._from_config(tiny_dsv4_config(**OVERRIDES), dtype=torch.float32)
    model.set_experts_implementation("eager")
    model = enable_sparse_attention(get_peft_model(model, dsv4_lora_config(r=8, targets="all")))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_model(model)
    if world > 1:
        enable_context_parallel(model)
    model.train()
    length = args.length
    ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(1))
    start, stop = chunk_bounds(length, world)[rank]
    inputs = {"input_ids": ids, "use_cache": False}
    if world > 1:  # as the trainer hands them: this rank's chunk and every rank's bounds
        inputs = {**chunk_inputs(inputs, rank, world), "use_cache": False}
    tick = time.perf_counter()
    with live_tensors(model) as live:
        model(**inputs).logits.float().mean().backward()
    seconds = time.perf_counter() - tick
    activations = sum(live.by_category.get(k, 0) for k in ("act", "temp"))
    result = {"rank": rank, "world": world, "length": length, "chunk": stop - start, "peak_mb": live.rise / MB,
              "activation_mb": activations / MB, "seconds": seconds}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def run(args: argparse.Namespace, length: int, world: int) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--length", str(length)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=args.timeout)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if not lines:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            return [{"world": world, "length": length, "error": f"exit {proc.returncode}: {tail[:200]}"}]
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def collective_bytes(length: int, world: int, model: dict) -> dict[str, float]:
    """MB one layer's collectives move per rank (each all-gather's output; backward all-reduces as much again)."""
    halo = max(model["window"] - 1, 2 * model["csa"] - 1, model["hca"] - 1)
    b = model["bytes"]
    return {
        "halo": world * min(halo, length // world) * model["hidden"] * b / MB,
        "csa_entries": length // model["csa"] * model["head_dim"] * b / MB,
        "indexer_keys": length // model["csa"] * model["index_head_dim"] * b / MB,
        "hca_entries": length // model["hca"] * model["head_dim"] * b / MB,
    }


def rank_flops(config, length: int, world: int) -> list[dict[str, float]]:
    """Per rank of `world` contiguous chunks of a `length`-token sequence: the training step's matmul FLOPs (TFLOP)
    of the lightning indexer, the attention scores (window + top-k / causal HCA entries; QK and PV) and everything
    else (the active parameters: projections, shared and top-k routed experts, LM head). A matmul counts its forward,
    the recompute of activation checkpointing and its backward (2x forward); the indexer has no backward."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    from hf_dsv4.modeling import chunk_bounds

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    dense = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." not in n and "embed_tokens" not in n)
    active = dense + routed * config.num_experts_per_tok / config.n_routed_experts
    kinds = config.layer_types
    score = config.num_attention_heads * config.head_dim * 2 * 2  # QK and PV, a multiply-add each
    index = config.index_n_heads * config.index_head_dim * 2
    ratio = config.compress_rates
    out = []
    for start, stop in chunk_bounds(length, world):
        t = torch.arange(start, stop, dtype=torch.float64)
        window = torch.clamp(t + 1, max=config.sliding_window)
        csa_entries = torch.div(t + 1, ratio["compressed_sparse_attention"], rounding_mode="floor")
        hca_entries = torch.div(t + 1, ratio["heavily_compressed_attention"], rounding_mode="floor")
        attention = sum(
            float((window + {"compressed_sparse_attention": torch.clamp(csa_entries, max=config.index_topk),
                             "heavily_compressed_attention": hca_entries}.get(kind, 0)).sum())
            for kind in kinds
        ) * score  # fmt: skip
        indexer = float(csa_entries.sum()) * index * kinds.count("compressed_sparse_attention")
        rest = 2 * active * (stop - start)
        out.append({"tokens": stop - start, "indexer": 2 * indexer / 1e12, "attention": 4 * attention / 1e12,
                    "rest": 4 * rest / 1e12})  # fmt: skip
    return out


def balance_table(length: int = 131072, world: int = 8) -> list[str]:
    from bench_flash_slice import flash_slice_config

    rows = rank_flops(flash_slice_config(43), length, world)
    totals = [r["indexer"] + r["attention"] + r["rest"] for r in rows]
    mean = sum(totals) / len(totals)
    lines = [f"DeepSeek-V4-Flash, {length:,} tokens over {world} ranks (contiguous chunks): TFLOP per rank per step",
             "| rank | tokens | indexer | attention | rest | total | vs mean |", "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for rank, (r, total) in enumerate(zip(rows, totals, strict=True)):
        lines.append(f"| {rank} | {r['tokens']:,} | {r['indexer']:.0f} | {r['attention']:.0f} | {r['rest']:.0f} | "
                     f"{total:.0f} | {total / mean:.3f} |")  # fmt: skip
    lines.append(
        f"the step waits for the slowest rank: a perfect balance would gain at most {max(totals) / mean - 1:.1%}"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--cp", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--balance", action="store_true", help="only the Flash load-balance table (no run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.balance:
        print("\n".join(balance_table()))
        return
    rows = {}
    for length in args.lengths:
        for world in args.cp:
            rows[(length, world)] = run(args, length, world)
    lines = ["| L | cp | tokens per rank | peak per rank (max) | activations per rank | vs cp 1 x cp | step s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (length, world), results in rows.items():
        if "error" in results[0]:
            lines.append(f"| {length} | {world} | {results[0]['error']} ||||")
            continue
        base = rows.get((length, 1))
        peak = max(r["peak_mb"] for r in results)
        act = max(r["activation_mb"] for r in results)
        ratio = "-"
        if base and "error" not in base[0]:
            ratio = f"{act * world / max(r['activation_mb'] for r in base):.2f}"
        lines.append(
            f"| {length} | {world} | {max(r['chunk'] for r in results)} | {peak:.0f} MB | {act:.0f} MB | {ratio} | "
            f"{max(r['seconds'] for r in results):.1f} |"
        )
    lines += ["", "MB per rank each collective of one layer moves (all-gather output; the gradient's all-reduce again):",
              "| model | L | cp | halo | CSA entries | indexer keys | HCA entries |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    small = dict(hidden=512, head_dim=64, index_head_dim=16, window=128, csa=4, hca=128, bytes=4)
    for name, spec, length, world in [("this model", small, max(args.lengths), max(args.cp)),
                                      ("Flash, bf16", FLASH, 131072, 8)]:  # fmt: skip
        b = collective_bytes(length, world, spec)
        lines.append(f"| {name} | {length} | {world} | {b['halo']:.1f} | {b['csa_entries']:.1f} | "
                     f"{b['indexer_keys']:.1f} | {b['hca_entries']:.1f} |")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}x{k[1]}": v for k, v in rows.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
