"""Packed vs padded batches for DeepSeek-V4 LoRA training: trained tokens per second, peak memory and padding, on a
long-tailed mix of sample lengths, side by side in one run (each way in a fresh process).

    python benchmarks/bench_packing.py                          # CPU, 48 samples log-uniform 128..4096, rows of 4096
    python benchmarks/bench_packing.py --samples 96 --min-len 128 --max-len 8192 --batch 2 --json /tmp/packing.json

The data: `--samples` token sequences whose lengths are log-uniform in [`--min-len`, `--max-len`] (seed 0: many
short chats, a tail of long agent traces), every token trained. The model: a small DeepSeek-V4 (`tiny_dsv4_config`
widened to hidden 512, 8 heads of 64, 3 layers: sliding, CSA, HCA with Flash's window of 128, compression 4 / 128,
the indexer's top 64; 8 routed experts, top-2), float32, LoRA "all"
(`dsv4_lora_config(r=8)`), `enable_sparse_attention`, AdamW on the adapter. One epoch over the samples, the same
samples both ways, with TRL's own data path:

- padded: `--batch` samples per step in dataset order, TRL's `DataCollatorForLanguageModeling` padding each batch to
  its longest sample (pad labels -100): what `SFTTrainer` does without packing;
- packed: TRL's `pack_dataset` (BFD) into rows of at most `--max-len` tokens, `--batch` rows per step, the
  padding-free collator (one row, positions restarting per sample, no pad): `--packing true`. Each sample is
  computed exactly as if alone (tests/test_packing.py), so both ways train on the same per-sample losses.

Each way reports the trained tokens per second (wall time of the epoch after one untimed warm-up step), the logical
peak of live tensors over the epoch (`benchmarks/_memory.py`: what a GPU would hold; headline) and the peak RSS rise
beside it, the fraction of pad tokens among the tokens computed, and the tokens per step. Last, the rows each routed
expert of a DeepSeek-V4-Flash-shaped MoE (256 experts, 6 per token) would get per step on each of 8 GPUs for those
tokens per step (tokens x 6 / 256; pad tokens are routed too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import MB, live_tensors, reset_rss_peak, rss_rise_mb  # noqa: E402

OVERRIDES = dict(
    hidden_size=512, num_attention_heads=8, head_dim=64, q_lora_rank=128, o_lora_rank=64, o_groups=2,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"], num_hidden_layers=3, sliding_window=128, index_topk=64,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    max_position_embeddings=16384,
)  # fmt: skip
FLASH_EXPERTS, FLASH_TOP_K = 256, 6


def lengths(args: argparse.Namespace) -> list[int]:
    """Log-uniform sample lengths in [min_len, max_len], seed 0."""
    import random

    rng = random.Random(0)
    low, high = math.log(args.min_len), math.log(args.max_len)
    return [int(round(math.exp(rng.uniform(low, high)))) for _ in range(args.samples)]


def batches(args: argparse.Namespace, way: str) -> list[dict]:
    """The epoch's batches, made by TRL's collator (and, packed, TRL's BFD packing)."""
    import torch
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 1000, (n,), generator=generator).tolist() for n in lengths(args)]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    if way == "packed":
        dataset = pack_dataset(dataset, args.max_len, "bfd")
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=way == "packed")
    examples = list(dataset)
    return [collate(examples[i : i + args.batch]) for i in range(0, len(examples), args.batch)]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import DeepseekV4ForCausalLM

    from hf_dsv4 import dsv4_lora_config, enable_sparse_attention, shard_model
    from hf_dsv4.testing.model import tiny_dsv4_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM._from_config(tiny_dsv4_config(**OVERRIDES), dtype=torch.float32)
    model.set_experts_implementation("eager")
    model = enable_sparse_attention(get_peft_model(model, dsv4_lora_config(r=8, targets="all")))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    shard_model(model)  # one process: FSDP2's layout, as the main job shards
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    epoch = batches(args, args.one)

    def step(batch: dict) -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(epoch[0])  # warm-up (the optimizer's state is made here), untimed
    losses, tick = [], time.perf_counter()
    for batch in epoch:
        losses.append(step(batch))
    seconds = time.perf_counter() - tick
    # memory grows with the tokens of a step: the largest step once more, tracked (torch's tracker of a model with
    # FSDP2 groups: its plain tracker cannot follow frozen parameters)
    largest = max(epoch, key=lambda b: b["input_ids"].numel())
    baseline = reset_rss_peak()
    with live_tensors(model, optimizer) as live:
        step(largest)
    trained = sum(int((b["labels"][..., 1:] != -100).sum()) for b in epoch)
    computed = sum(b["input_ids"].numel() for b in epoch)
    real = sum(lengths(args))
    result = {
        "way": args.one, "steps": len(epoch), "seconds": seconds, "trained_tokens": trained,
        "tokens_per_s": trained / seconds, "computed_tokens": computed, "pad_fraction": (computed - real) / computed,
        "tokens_per_step": computed / len(epoch), "peak_mb": live.rise / MB, "rss_mb": rss_rise_mb(baseline),
        "mean_loss": sum(losses) / len(losses),
    }  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_one(args: argparse.Namespace, way: str) -> dict:
    command = [sys.executable, __file__, "--one", way, "--samples", str(args.samples), "--min-len", str(args.min_len),
               "--max-len", str(args.max_len), "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"way": way, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def table(results: list[dict], args: argparse.Namespace) -> list[str]:
    out = [
        f"{args.samples} samples, log-uniform {args.min_len}..{args.max_len} tokens ({sum(lengths(args))} tokens), "
        f"{args.batch} samples (padded) or rows (packed) per step, rows of {args.max_len}; CPU, {args.threads} threads",
        "| way | steps | tokens/step | pad | trained tokens/s | vs padded | logical peak | vs padded | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    padded = next((r for r in results if r["way"] == "padded" and "error" not in r), None)
    for r in results:
        if "error" in r:
            out.append(f"| {r['way']} | {r['error']} |||||||||")
            continue
        speed = f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}x" if padded else "-"
        memory = f"{r['peak_mb'] / padded['peak_mb']:.2f}x" if padded else "-"
        out.append(
            f"| {r['way']} | {r['steps']} | {r['tokens_per_step']:.0f} | {100 * r['pad_fraction']:.1f}% | "
            f"{r['tokens_per_s']:.0f} | {speed} | {r['peak_mb']:.0f} MB | {memory} | {r['rss_mb']:.0f} MB |"
        )
    out += ["", "Rows per routed expert per step on each GPU, a Flash-shaped MoE (256 experts, top-6), 8 GPUs:",
            "| way | tokens per GPU-step | rows per expert (all) | of them real tokens |", "|---|---:|---:|---:|"]  # fmt: skip
    for r in results:
        if "error" not in r:
            real = r["tokens_per_step"] * (1 - r["pad_fraction"])
            rows = r["tokens_per_step"] * FLASH_TOP_K / FLASH_EXPERTS
            out.append(
                f"| {r['way']} | {r['tokens_per_step']:.0f} | {rows:.1f} | {real * FLASH_TOP_K / FLASH_EXPERTS:.1f} |"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=4096, help="the longest sample, and a packed row's length")
    parser.add_argument("--batch", type=int, default=2, help="samples (padded) or packed rows per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per way")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--one", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        worker(args)
        return
    results = [run_one(args, way) for way in ("padded", "packed")]
    print("\n".join(table(results, args)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
