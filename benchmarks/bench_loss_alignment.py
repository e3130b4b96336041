"""Loss alignment of the main job: the same data, seed and global batch on 2 FSDP2 ranks and on 1 process.

    python benchmarks/bench_loss_alignment.py [--steps 40] [--out docs/images]

Runs `recipes/sft_dsv4.py` twice on the tiny DeepSeek-V4 in fp32 (LoRA on attention, shared and routed experts):
(a) `accelerate launch --config_file accelerate_configs/fsdp2_cpu_2proc.yaml`, 2 CPU ranks x 2 samples per step;
(b) `accelerate launch --num_processes 1 --cpu`, 2 samples x 2 gradient-accumulation steps.
The data are the demo rows that fit 256 tokens, a multiple of the global batch of 4 (a ragged last batch of an epoch
is wrapped around by the distributed sampler, so a 1-process run would see other samples). It prints the per-step
losses and their relative difference, the largest difference between the two final adapters, and plots both curves
to `<out>/loss_alignment.png` (needs matplotlib: `pip install -e ".[bench]"`; without it the table is still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_recipe import short_rows  # noqa: E402 - the same data selection as the alignment test

RUNS = {
    "2 ranks, FSDP2": ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml")],
    "1 process": ["--num_processes", "1", "--num_cpu_threads_per_process", "1", "--cpu"],
}


def run(name: str, launcher: list[str], common: list[str], out: Path) -> tuple[dict[int, float], Path, float]:
    extra = ["--gradient_accumulation_steps", "2"] if name == "1 process" else []
    folder = out / name.split(",")[0].replace(" ", "_")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / "recipes" / "sft_dsv4.py"),
           *common, *extra, "--output_dir", str(folder)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    steps = max(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))
    history = json.loads((folder / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}, folder, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from hf_dsv4.testing import build_tiny_dsv4

        model = build_tiny_dsv4(tmp / "tiny", dtype=torch.float32, seed=0)
        data = short_rows(tmp / "short.jsonl")
        common = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--dtype", "float32",
                  "--bf16", "false", "--use_cpu", "true", "--max_length", "256", "--max_steps", str(args.steps),
                  "--save_steps", str(args.steps), "--logging_steps", "1", "--per_device_train_batch_size", "2",
                  "--learning_rate", "0.005", "--lora_target_modules", "all", "--report_to", "none", "--seed", "42"]  # fmt: skip
        results = {name: run(name, launcher, common, tmp) for name, launcher in RUNS.items()}
        (a, folder_a, time_a), (b, folder_b, time_b) = results.values()
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        print(f"wall time: 2 ranks {time_a:.0f} s, 1 process {time_b:.0f} s (including start-up)")
        print("| step | loss, 2 ranks FSDP2 | loss, 1 process | relative difference |")
        print("| ---: | ---: | ---: | ---: |")
        worst = 0.0
        for step in sorted(a):
            diff = abs(a[step] - b[step]) / abs(b[step])
            worst = max(worst, diff)
            print(f"| {step} | {a[step]:.6f} | {b[step]:.6f} | {diff:.1e} |")
        x = load_file(folder_a / "adapter_model.safetensors")
        y = load_file(folder_b / "adapter_model.safetensors")
        adapter = max(((x[k] - y[k]).abs().max() / y[k].abs().max().clamp(min=1e-12)).item() for k in y)
        print(f"largest relative loss difference: {worst:.1e}; largest adapter difference (relative to the "
              f"tensor's max): {adapter:.1e} over {len(y)} tensors")  # fmt: skip
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(sorted(a), [a[s] for s in sorted(a)], "o-", label="2 ranks, FSDP2 (gloo), 2 x 2 samples", ms=4)
        ax.plot(sorted(b), [b[s] for s in sorted(b)], "x--", label="1 process, 2 samples x 2 accumulation", ms=6)
        ax.set(xlabel="step", ylabel="training loss",
               title=f"hf_dsv4 tiny DeepSeek-V4, LoRA, fp32: max relative difference {worst:.0e}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "loss_alignment.png", dpi=120)
        print(f"plot: {args.out / 'loss_alignment.png'}")


if __name__ == "__main__":
    main()
