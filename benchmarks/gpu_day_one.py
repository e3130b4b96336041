"""Day one on a GPU node: the main job's whole path on a DeepSeek-V4-Flash-width slice, in one command, one table.

    python benchmarks/gpu_day_one.py                 # every GPU of this node (NCCL), a 5-layer Flash slice
    python benchmarks/gpu_day_one.py --tiny          # the same path on the tiny model, 2 CPU ranks (gloo): what CI runs

The command is a driver: it writes a release-layout checkpoint (FP8 / FP4 with ue8m0 scales, DeepSeek-native names,
random values) and starts the recipe (`recipes/sft_dsv4.py`'s `main`, with its flags) twice under `accelerate
launch` with the project's FSDP2 config (`accelerate_configs/fsdp2_1node_8gpu.yaml`, one rank per GPU; `--tiny`:
`fsdp2_cpu_2proc.yaml`), each a fresh process group as in production. Both read the checkpoint streamed, every rank
its own rows (`--stream_readers all`) in pieces (`--stream_read_budget_mb`), with sparse attention, LoRA on every
adapted module incl. the routed experts (`all`), activation checkpointing, bf16 weights, the demo data:

1. dequantized: the base dequantized to bf16 by transformers while it streams (with transformers' eager experts
   loop, what the quantized experts compute), steps 1 .. `--save-at` + 1, a sharded checkpoint (DCP,
   `SHARDED_STATE_DICT`: adapter + optimizer shards) after step `--save-at`;
2. quantized, the main job's way: the base kept quantized in the shards (`--keep_quantized`, experts per expert),
   resumed from that checkpoint to step `--steps`, another sharded checkpoint at the end. Its first step must give the
   loss of the same step of (1) bit for bit: the logits over the quantized base are those over the dequantized one
   (the dequantization is exact) and the adapter, optimizer state, data position and RNG come back from the
   checkpoint. Only that step is compared: afterwards the runs may differ by rounding (the routed-expert LoRA
   gradients are summed per expert over the quantized base, in one batched product over the dequantized one;
   `tests/test_quantized.py`).

Then the adapter of (2) is exported for vLLM (`hf_dsv4.export_adapter`), and `benchmarks/flash_rehearsal.py` (if
there) traces the same step of the same model (`--layers 5`; `--tiny`) beside the runs, for its peak next to the
measured one.

The slice is V4-Flash's first 5 decoder layers at full width (hidden 4096, 256 routed experts of 2048, 64 heads of
512, vocab 129,280): sliding-window attention x 2, CSA, HCA, CSA; hash routing x 3, then top-k, so every attention and
router kind runs. 22 GB on disk (encoded one tensor at a time, written from the driver's memory); ~70 GB of bf16
dequantized, ~9 GB per GPU on 8. `--tiny`: the project's tiny release-layout model (`hf_dsv4.testing`: sliding, CSA,
HCA; hash, top-k, top-k) on `--ranks` CPU ranks.

Reported, as one markdown table: the exactness check; tokens/s of each run (all ranks' non-padding tokens per second,
the median over its steps but the first and the one after a checkpoint save); MFU of (2): 6 x the active parameters
per token x tokens/s over the GPUs' peak dense bf16 FLOPs (the usual convention; with a frozen base and activation
checkpointing the GPUs do about that: forward, recompute, input gradients; attention scores are not counted); the
peak memory per rank over the training steps of (2): on GPUs `torch.cuda.max_memory_allocated`, max over ranks; on
CPU the logical peak of live tensors from torch's FSDP2 memory tracker (`hf_dsv4.compat.memory_tracker`), which slows
a CPU step several times, so (2) has no CPU tokens/s. A run that fails on any rank (the launcher then stops them all)
or runs past `--timeout` (then killed) stops the command with the end of its log; a failed check prints the table and
exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "recipes"))

from _common import build_flash_release, flash_slice_config, machine  # noqa: E402

FLASH_SLICE_LAYERS = 5  # sliding x 2, CSA, HCA, CSA; hash-routed x 3, then top-k: every layer and router kind
PHASES = ("dequantized", "quantized")
DATA = REPO / "recipes" / "data" / "dsv4_demo.jsonl"
CONFIGS = REPO / "accelerate_configs"
# Peak dense bf16 tensor FLOPs per GPU (vendor data sheets), matched by substring of the device name, first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12))  # fmt: skip
EAGER_EXPERTS = json.dumps({"experts_implementation": "eager"})
ROWS = ("machine", "checkpoint", "loading", "training", "exactness vs dequantized base",
        "resume from sharded checkpoint", "export", "tokens/s", "MFU", "peak memory per rank", "rehearsal peak per rank")  # fmt: skip


def build_release(path: Path, tiny: bool, seed: int = 0) -> None:
    """Write the release-layout checkpoint with a tokenizer (the tiny one for the Flash slice too: the data's token ids
    are all below its vocabulary); the Flash slice's tensors are encoded and written one at a time
    (`_common.build_flash_release`)."""
    from hf_dsv4.testing import build_release_dsv4

    if tiny:
        build_release_dsv4(path, seed=seed)
        return
    from hf_dsv4.testing.tokenizer import tiny_tokenizer

    build_flash_release(path, seed=seed, config=flash_slice_config(FLASH_SLICE_LAYERS))
    tiny_tokenizer().save_pretrained(path)


# ------------------------------------------------------------------------------------------ one run (every rank)


def recipe_flags(args: argparse.Namespace, phase: str, cuda: bool) -> list[str]:
    """The recipe's command line for `phase`."""
    out = args.out / phase
    flags = ["--model_name_or_path", str(args.ckpt), "--dataset_name", str(DATA), "--output_dir", str(out),
             "--dtype", "bfloat16", "--bf16", str(cuda).lower(), "--use_cpu", str(not cuda).lower(),
             "--stream_weights", "true", "--stream_readers", "all", "--stream_read_budget_mb", str(args.read_budget_mb),
             "--sparse_attention", "true", "--activation_checkpointing", "true",
             "--lora_target_modules", "all", "--lora_r", "16", "--lora_alpha", "32",
             "--max_length", str(args.seq_len), "--overlong", "truncate", "--per_device_train_batch_size", "1",
             "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
             "--logging_steps", "1", "--seed", "42", "--report_to", "none", "--dataloader_num_workers", "0",
             "--save_strategy", "steps"]  # fmt: skip
    if phase == "dequantized":  # the experts loop the quantized experts compute
        return [*flags, "--max_steps", str(args.save_at + 1), "--save_steps", str(args.save_at),
                "--model_init_kwargs", EAGER_EXPERTS]  # fmt: skip
    checkpoint = args.out / "dequantized" / f"checkpoint-{args.save_at}"
    return [*flags, "--max_steps", str(args.steps), "--save_steps", str(args.steps), "--keep_quantized", "true",
            "--resume_from_checkpoint", str(checkpoint)]  # fmt: skip


def run_phase(args: argparse.Namespace) -> None:
    """One rank of one run: the recipe's `main` with a callback that measures the training steps; writes
    `<out>/<phase>/rank<r>.json`. A failure propagates (the launcher then stops every rank)."""
    import sft_dsv4
    import torch
    from transformers import TrainerCallback

    from hf_dsv4 import compat

    cuda = torch.cuda.is_available() and not args.tiny
    started = time.perf_counter()
    measured: dict = {}

    class Measure(TrainerCallback):
        """The time to the first step and the peak memory of the training steps: on a GPU the allocator's; on CPU the
        live tensors' (torch's FSDP2 memory tracker, entered once for the whole run: its exit leaves hooks behind on
        FSDP2 groups of several modules, so it cannot measure one step of a run that goes on)."""

        tracker = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            measured.update(to_first_step_s=time.perf_counter() - started, device="cpu")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                measured["device"] = torch.cuda.get_device_name()
                return
            optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            self.tracker = compat.memory_tracker(model, optimizer)
            self.tracker.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.tracker is not None:
                compat.end_of_step(self.tracker)

        def on_train_end(self, args, state, control, **kwargs):
            if cuda:
                measured["peak_bytes"] = torch.cuda.max_memory_allocated()
            else:
                self.tracker.__exit__(None, None, None)
                measured["peak_bytes"] = max(c["total"] for c in compat.tracker_peak(self.tracker).values())

    trainer = sft_dsv4.main(
        *sft_dsv4.parse_args(recipe_flags(args, args.phase, cuda)),
        callbacks=[Measure()] if args.phase == "quantized" else None,
    )
    rank = trainer.args.process_index
    result = {**measured, "rank": rank, "world": trainer.args.world_size, "log_history": trainer.state.log_history}
    (args.out / args.phase / f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the process group is gone (the recipe ended it); skip gloo's thread teardown at exit


# ----------------------------------------------------------------------------------------------------- driver


def launch(args: argparse.Namespace, phase: str, ranks: int, cuda: bool) -> list[dict]:
    """`accelerate launch` this script for `phase` on `ranks` ranks; every rank's result. Raises with the log's tail
    if the launch fails or runs past `--timeout` (then the launcher and every rank are killed)."""
    folder = args.out / phase
    shutil.rmtree(folder, ignore_errors=True)  # no stale results or checkpoints of an earlier run
    folder.mkdir(parents=True)
    config = CONFIGS / ("fsdp2_1node_8gpu.yaml" if cuda else "fsdp2_cpu_2proc.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(ranks), __file__, *sys.argv[1:], "--phase", phase]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not cuda:  # CPU ranks, also on a machine with GPUs (the CPU config's note)
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    log_path = args.out / f"{phase}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            status = f"killed after {args.timeout:.0f} s"
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    if status != 0 or len(results) != ranks:
        tail = log_path.read_text()[-6000:]
        raise RuntimeError(f"{phase}: accelerate launch exited with {status} ({len(results)} of {ranks} ranks "
                           f"finished); its log {log_path} ends with:\n{tail}")  # fmt: skip
    return results


def logged_steps(results: list[dict], first: int) -> dict[int, dict]:
    """Step -> rank 0's training log entry (loss: the mean over ranks), for the steps this run made (a resumed run's
    history also holds the steps before its checkpoint)."""
    return {e["step"]: e for e in results[0]["log_history"] if "loss" in e and e["step"] >= first}


def tokens_per_second(steps: dict[int, dict], left_out: set[int]) -> tuple[float, int]:
    """The median tokens/s over `steps` but `left_out` (all of them if none is left), and how many steps it is of."""
    timed = [e["tokens_per_second"] for step, e in steps.items() if step not in left_out] or [
        e["tokens_per_second"] for e in steps.values()
    ]
    return statistics.median(timed), len(timed)


def active_parameters(ckpt: Path) -> int:
    """Parameters a token goes through: all but the embedding, routed experts counted for top-k of the experts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    share = config.num_experts_per_tok / config.n_routed_experts
    return int(sum(p.numel() * (share if ".mlp.experts." in n else 1) for n, p in model.named_parameters()
                   if "embed_tokens" not in n))  # fmt: skip


def peak_flops(device: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16_FLOPS if name in device), None)


def start_rehearsal(args: argparse.Namespace, ranks: int) -> subprocess.Popen | str:
    """`flash_rehearsal.py` started beside the runs (it only traces, in one process), or why it is not."""
    script = REPO / "benchmarks" / "flash_rehearsal.py"
    if not script.is_file():
        return "n/a (benchmarks/flash_rehearsal.py is not there)"
    model = ["--tiny"] if args.tiny else ["--layers", str(FLASH_SLICE_LAYERS)]
    command = [sys.executable, str(script), "--ranks", str(ranks), "--tokens", str(args.seq_len), "--targets", "all",
               "--keep-quantized", "--json", *model]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rehearsal_cell(args: argparse.Namespace, started: subprocess.Popen | str) -> str:
    """The rehearsal's traced peak per rank, or why there is none."""
    if isinstance(started, str):
        return started
    try:
        stdout, stderr = started.communicate(timeout=args.timeout)
        result = json.loads(stdout)
        of = "the same model" if args.tiny else f"Flash's first {result['layers']} layers, the same slice"
        return f"{result['peak_gib_per_rank']:.3g} GiB traced by flash_rehearsal.py ({of}, {args.seq_len} tokens)"
    except subprocess.TimeoutExpired:
        started.kill()
        return f"n/a (flash_rehearsal.py ran past {args.timeout:.0f} s)"
    except (ValueError, KeyError, TypeError):
        why = (stderr.strip().splitlines() or ["no output"])[-1][:200]
        return f"n/a (flash_rehearsal.py exited with {started.returncode}: {why})"


def exported_tensors(adapter: Path, out: Path) -> int:
    """Export the adapter for vLLM (`hf_dsv4.export_adapter`); the number of tensors written."""
    from safetensors import safe_open

    from hf_dsv4 import export_adapter

    with safe_open(str(export_adapter(adapter, out) / "adapter_model.safetensors"), "pt") as exported:
        return len(list(exported.keys()))


def throughput(args: argparse.Namespace, steps: dict[str, dict[int, dict]], cuda: bool, ranks: int, device: str):
    """The tokens/s and MFU cells: each run's median over its steps but the first and the one after a save."""
    first = args.save_at + 1
    dequantized, n_dequantized = tokens_per_second(steps["dequantized"], {1, first})
    quantized, n_quantized = tokens_per_second(steps["quantized"], {first})
    cell = f"{dequantized:,.1f} dequantized (median of {n_dequantized} step(s)), all ranks"
    if not cuda:
        return f"n/a kept quantized (its CPU steps run under torch's memory tracker); {cell}", "n/a (CPU)"
    flops, mfu = peak_flops(device), f"n/a (no peak bf16 FLOPs known for {device})"
    if flops:
        active = active_parameters(args.ckpt)
        mfu = (f"{6 * active * quantized / (ranks * flops):.2%} kept quantized (6 x {active / 1e9:.2f} B active "
               f"parameters per token, {flops / 1e12:.0f} TFLOPS per GPU)")  # fmt: skip
    return f"{quantized:,.1f} kept quantized (median of {n_quantized} steps); {cell}", mfu


def checkpoint_cell(args: argparse.Namespace, built_s: float | None) -> str:
    config = json.loads((args.ckpt / "config.json").read_text())
    layers = config["num_hidden_layers"]
    size_mb = sum(f.stat().st_size for f in args.ckpt.glob("*.safetensors")) / 2**20
    return (f"release layout (FP8 / FP4 + ue8m0 scales), {'tiny' if args.tiny else 'Flash-width'}, {layers} layers "
            f"(compress ratios {config['compress_ratios'][:layers]}, {config['num_hash_layers']} hash-routed), "
            f"{size_mb:,.1f} MB, " + ("already there" if built_s is None else f"written in {built_s:.1f} s"))  # fmt: skip


def measure(args: argparse.Namespace) -> tuple[dict[str, str], bool]:
    """Everything the table shows, and whether the exactness check passed."""
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    ranks = torch.cuda.device_count() if cuda else args.ranks
    start, built_s = time.perf_counter(), None
    if not (args.ckpt / "model.safetensors.index.json").is_file():
        print(f"writing the release-layout checkpoint to {args.ckpt} ...", flush=True)
        build_release(args.ckpt, args.tiny)
        built_s = time.perf_counter() - start
    rehearsal = start_rehearsal(args, ranks)
    runs = {}
    for phase in PHASES:
        print(f"{phase}: accelerate launch, {ranks} {'GPU' if cuda else 'CPU'} ranks ...", flush=True)
        runs[phase] = launch(args, phase, ranks, cuda)
    first = args.save_at + 1
    steps = {"dequantized": logged_steps(runs["dequantized"], 1), "quantized": logged_steps(runs["quantized"], first)}
    quantized, dequantized = steps["quantized"][first]["loss"], steps["dequantized"][first]["loss"]
    exact = quantized == dequantized
    main_run = runs["quantized"]
    device = main_run[0]["device"]
    tokens_per_s, mfu = throughput(args, steps, cuda, ranks, device)
    how = "torch.cuda.max_memory_allocated" if cuda else "live tensors, torch's FSDP2 memory tracker"
    budget = f"{args.read_budget_mb * 1024:.0f} KB" if args.read_budget_mb < 1 else f"{args.read_budget_mb:.0f} MB"
    losses = {run: ", ".join(f"{e['loss']:.4f}" for e in steps[run].values()) for run in PHASES}
    resumed = f"{first}" if first == args.steps else f"{first}-{args.steps}"
    table = {
        "machine": f"{machine()}; {ranks} x {device} (NCCL)" if cuda else f"{machine()}; {ranks} CPU ranks (gloo)",
        "checkpoint": checkpoint_cell(args, built_s),
        "loading": f"streamed, readers=all, read budget {budget}; kept quantized (experts per expert): recipe start to "
        f"step 1 in {max(r['to_first_step_s'] for r in main_run):.1f} s",
        "training": f"LoRA all r=16, activation checkpointing, sparse attention, bf16, batch 1 x <= {args.seq_len} "
        f"tokens per rank; steps 1-{first} dequantized (losses {losses['dequantized']}), {resumed} kept quantized "
        f"(losses {losses['quantized']})",
        "exactness vs dequantized base": f"step {first} loss {quantized!r} kept quantized vs {dequantized!r} "
        f"dequantized to bf16: {'bit-equal' if exact else 'DIFFERENT'}",
        "resume from sharded checkpoint": f"checkpoint-{args.save_at} (DCP optimizer shards + PEFT adapter) of the "
        f"dequantized run resumed kept quantized: step {first} as above; checkpoint-{args.steps} saved",
        "export": f"vLLM layout: {exported_tensors(args.out / 'quantized', args.out / 'vllm')} tensors "
        "(hf_dsv4.export_adapter)",
        "tokens/s": tokens_per_s,
        "MFU": mfu,
        "peak memory per rank": f"{max(r['peak_bytes'] for r in main_run) / 2**30:.3g} GiB kept quantized (max over "
        f"ranks; {how})",
        "rehearsal peak per rank": rehearsal_cell(args, rehearsal),
    }  # fmt: skip
    return table, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on --ranks CPU ranks (gloo)")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks with --tiny (on GPUs: one per GPU)")
    parser.add_argument("--ckpt", type=Path, default=None, help="release-layout checkpoint (written if missing)")
    parser.add_argument("--out", type=Path, default=None, help="runs, logs, adapters (default /tmp/hf_dsv4_day_one_*)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps in all (default 8; --tiny 2)")
    parser.add_argument("--save-at", type=int, default=None, help="the step checkpointed by (1) (default 2; --tiny 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="max tokens per sample (default 4096; --tiny 256)")
    parser.add_argument("--read-budget-mb", type=float, default=None, help="streamed read pieces (512; --tiny 0.0625)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch before every rank is killed")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = "tiny" if args.tiny else "flash"
    args.ckpt = args.ckpt or Path(f"/tmp/hf_dsv4_day_one_{name}_release")
    args.out = args.out or Path(f"/tmp/hf_dsv4_day_one_{name}")
    args.steps = args.steps or (2 if args.tiny else 8)
    args.save_at = args.save_at or (1 if args.tiny else 2)
    args.seq_len = args.seq_len or (256 if args.tiny else 4096)
    args.read_budget_mb = args.read_budget_mb or (0.0625 if args.tiny else 512)
    if args.phase:
        return run_phase(args)
    if not 0 < args.save_at < args.steps:
        parser.error(f"--save-at must be between 0 and --steps ({args.steps}), exclusive")
    table, passed = measure(args)
    print("\n| gpu_day_one | result |\n| --- | --- |")
    for row in ROWS:
        print(f"| {row} | {table[row]} |")
    if args.json:
        args.json.write_text(json.dumps({"table": table, "passed": passed}, indent=1))
    if not passed:
        print("\na check FAILED (see the table)", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
