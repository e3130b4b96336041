"""Host memory and wall time of loading + sharding a DeepSeek-V4 checkpoint on N ranks, three ways.

    python benchmarks/bench_load.py                 # 2 CPU ranks (gloo), ~1 GB bf16 checkpoint built locally
    python benchmarks/bench_load.py --ranks 2 --ckpt /path/to/dsv4 --backend nccl   # on GPUs
    python benchmarks/bench_load.py --layout flash --modes gh --read_budget_mb 512 --repeats 1   # Flash-width layer
    python benchmarks/bench_load.py --modes acdeg --repeats 1 --plot docs/images/load_memory.png

(a) stock transformers: every rank calls `from_pretrained` (what transformers 5 does under FSDP, even with
    FSDP_CPU_RAM_EFFICIENT_LOADING);
(b) stock accelerate FSDP2 with cpu_ram_efficient_loading: every rank `from_pretrained`, then accelerate's
    `fsdp2_prepare_model` (called directly: on CPU processes `Accelerator.prepare` ignores FSDP);
(c) hf_dsv4: `memory_efficient_init` + `shard_model`;
(d) hf_dsv4 streamed: `memory_efficient_init(stream=True)` + `shard_model` (every rank builds on meta; rank 0 reads
    the checkpoint one decoder layer at a time while the shards fill, the next layer while one is sent);
(e) hf_dsv4 streamed, every rank reading: `memory_efficient_init(stream=True, readers="all")` + `shard_model` (each
    rank reads and converts only the rows of its own shards; no weight is sent);
(f) as (d) with `shard_model(read_ahead=False)`: rank 0 reads a layer only once the previous one is sent;
(g) as (d) with `memory_efficient_init(stream=True, read_budget=...)` (`--read_budget_mb`, default 16): rank 0 reads
    each rank's rows in pieces of at most the budget and sends each to its rank, never holding a whole layer;
(h) as (e) with the same read budget: every rank reads its own rows in pieces;
(s) for scale, not a goal: (a) followed by the same FSDP2 layout as (c) (`hf_dsv4.sharding.apply_fsdp` on every rank's
    full copy, each rank slicing its own shards), i.e. stock loading that ends, like (c), with a sharded model.

Per rank (`benchmarks/_memory.py`) it prints the peak RSS rise (VmHWM, reset just before loading, minus VmRSS at that
moment; under default glibc, so it includes freed memory glibc keeps), the wall time from a barrier before loading to
a barrier after sharding, the CPU seconds of the process (all threads) and its minor page faults over the same span;
for (c) also the wall time of the rank-aware `from_pretrained` alone. Then each rank loads a second time under torch's
memory tracker, for the logical peak of live tensors over loading + sharding (tensors made by torch ops in the rank's
main thread: what a GPU would hold; a loader that builds tensors in other threads is undercounted). On a shared
machine the CPU seconds and page faults are steadier than the wall time. A crash is reported, not hidden.
`--plot out.png` draws both peaks per rank and mode as bars (needs matplotlib: `pip install -e ".[docs]"`).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import build_checkpoint, machine  # noqa: E402
from _memory import MB, live_tensors, reset_rss_peak, rss_rise_mb  # noqa: E402

MODES = {"a": "stock transformers (every rank from_pretrained)", "b": "stock accelerate FSDP2 cpu_ram_efficient_loading",
         "c": "hf_dsv4 memory_efficient_init + shard_model",
         "d": "hf_dsv4 memory_efficient_init(stream=True) + shard_model",
         "e": "hf_dsv4 memory_efficient_init(stream=True, readers=\"all\") + shard_model",
         "f": "(d) with shard_model(read_ahead=False)",
         "g": "(d) with read_budget (rank 0 reads each rank's rows in pieces)",
         "h": "(e) with read_budget (each rank reads its rows in pieces)",
         "s": "(a) + fully_shard on every rank's full copy (scale only)"}  # fmt: skip
SHORT = {"a": "stock", "b": "stock accelerate", "c": "rank 0 loads", "d": "streamed,\nrank 0 reads",
         "e": "streamed,\nevery rank reads", "f": "(d), no read-ahead", "g": "(d) in pieces\n(read budget)",
         "h": "(e) in pieces\n(read budget)", "s": "stock + fully_shard"}  # fmt: skip
PHASES: dict[str, float] = {}  # wall seconds of named phases of one run, filled by the loaders


def _cpu_and_faults() -> tuple[float, int]:
    """(CPU seconds of this process, all threads, user + system; minor page faults) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


# ---------------------------------------------------------------------------------------------- one rank


def _load_stock(ckpt: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)


def _load_accelerate(ckpt: str, dtype):
    """accelerate 1.15's FSDP2 path as `Accelerator.prepare` runs it under `fsdp_cpu_ram_efficient_loading`."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model = _load_stock(ckpt, dtype)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="transformer_based_wrap"
    )
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=dist.get_rank() == 0,
        device=device, torch_device_mesh=None, parallelism_config=None,
    )  # fmt: skip
    return fsdp2_prepare_model(accelerator, model)


def _load_hf_dsv4(ckpt: str, dtype):
    from transformers import AutoModelForCausalLM

    from hf_dsv4 import memory_efficient_init, shard_model

    start = time.perf_counter()
    with memory_efficient_init():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    PHASES["load_s"] = time.perf_counter() - start
    return shard_model(model)


def _load_hf_dsv4_streamed(
    ckpt: str, dtype, read_ahead: bool = True, readers: str = "rank0", read_budget: int | None = None
):
    from transformers import AutoModelForCausalLM

    from hf_dsv4 import memory_efficient_init, shard_model

    start = time.perf_counter()
    with memory_efficient_init(stream=True, readers=readers, read_budget=read_budget):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    PHASES["load_s"] = time.perf_counter() - start
    return shard_model(model, read_ahead=read_ahead)


def _load_hf_dsv4_streamed_by_all(ckpt: str, dtype):
    return _load_hf_dsv4_streamed(ckpt, dtype, readers="all")


def _load_hf_dsv4_streamed_in_pieces(ckpt: str, dtype):
    return _load_hf_dsv4_streamed(ckpt, dtype, read_budget=int(float(os.environ["BENCH_READ_BUDGET_MB"]) * 2**20))


def _load_hf_dsv4_streamed_by_all_in_pieces(ckpt: str, dtype):
    budget = int(float(os.environ["BENCH_READ_BUDGET_MB"]) * 2**20)
    return _load_hf_dsv4_streamed(ckpt, dtype, readers="all", read_budget=budget)


def _load_hf_dsv4_streamed_in_turn(ckpt: str, dtype):
    return _load_hf_dsv4_streamed(ckpt, dtype, read_ahead=False)


def _load_stock_and_shard(ckpt: str, dtype):
    """(a), then the FSDP2 layout of (c) applied to every rank's full copy (FSDP2 slices each rank's own shards)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hf_dsv4.sharding import apply_fsdp

    start = time.perf_counter()
    model = _load_stock(ckpt, dtype)
    PHASES["load_s"] = time.perf_counter() - start
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    apply_fsdp(model, init_device_mesh(device, (dist.get_world_size(),)))
    if device == "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    return model


def worker(mode: str, ckpt: str, out: str, backend: str) -> None:
    """One rank: load with `mode`, write {rank, logical_mb, rise_mb, wall_s, error, ...} to `out`/rank<r>.json."""
    import accelerate.utils.fsdp_utils  # noqa: F401 - every library is imported before the baseline
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    import hf_dsv4.training  # noqa: F401 - every hf_dsv4 layer (and trl, peft), as `import hf_dsv4` once did eagerly

    if mode == "b":  # what `accelerate launch` sets for fsdp_cpu_ram_efficient_loading
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true", FSDP_VERSION="2")
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    load = {"a": _load_stock, "b": _load_accelerate, "c": _load_hf_dsv4, "d": _load_hf_dsv4_streamed,
            "e": _load_hf_dsv4_streamed_by_all, "f": _load_hf_dsv4_streamed_in_turn,
            "g": _load_hf_dsv4_streamed_in_pieces, "h": _load_hf_dsv4_streamed_by_all_in_pieces,
            "s": _load_stock_and_shard}[mode]  # fmt: skip
    dist.barrier()
    baseline = reset_rss_peak()
    cpu_start, faults_start = _cpu_and_faults()
    start = time.perf_counter()
    error = model = None
    try:
        model = load(ckpt, torch.bfloat16)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    if error is None:
        dist.barrier()
    wall = time.perf_counter() - start
    cpu, faults = _cpu_and_faults()
    result = {"rank": dist.get_rank(), "rise_mb": rss_rise_mb(baseline), "wall_s": wall, "error": error,
              "cpu_s": cpu - cpu_start, "faults": faults - faults_start, **PHASES}  # fmt: skip
    del model
    if error is None:  # a second load under the tracker: the logical peak (its dispatch hook is in no figure above)
        with live_tensors() as live:
            model = load(ckpt, torch.bfloat16)
            dist.barrier()
        result["logical_mb"] = live.rise / MB
        del model
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    if error is None:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver


def run_mode(mode: str, ckpt: Path, ranks: int, backend: str, out: Path, port: int, timeout: float) -> list[dict]:
    """Launch `ranks` processes of this script in worker mode; return their results (or the failure)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank*.json"):
        stale.unlink()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks),
           "LOCAL_WORLD_SIZE": str(ranks), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, "--ckpt", str(ckpt), "--out", str(out), "--backend", backend],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=open(out / f"rank{r}.log", "w"),  # noqa: SIM115
        )
        for r in range(ranks)
    ]
    return collect_ranks(procs, out, timeout, {"logical_mb": None, "rise_mb": None, "wall_s": None})


def collect_ranks(procs: list[subprocess.Popen], out: Path, timeout: float, missing: dict | None = None) -> list[dict]:
    """Wait for the rank processes (killed after `timeout` seconds in all) and read each one's `out`/rank<r>.json; a
    rank that wrote none gets `missing` and an error with its exit status and the last line of `out`/rank<r>.log."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    results = []
    for r, proc in enumerate(procs):
        path = out / f"rank{r}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:
            tail = (out / f"rank{r}.log").read_text().strip().splitlines()[-1:] or ["no output"]
            results.append({"rank": r, **(missing or {}), "error": f"exit {proc.returncode}: {tail[0][:160]}"})
    return results


def plot(runs: dict[str, list[list[dict]]], ranks: int, title: str, path: Path) -> None:
    """Per mode, each rank's median logical peak (solid) and RSS rise (hatched) as bars; a failed mode is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(runs), 4))
    width = 0.8 / (2 * ranks)
    for i, results in enumerate(runs.values()):
        failed = any(r["error"] for run in results for r in run)
        for r in range(ranks):
            for j, (field, hatch) in enumerate((("logical_mb", None), ("rise_mb", "//"))):
                x = i - 0.4 + width * (2 * r + j + 0.5)
                value = 0 if failed else statistics.median(run[r][field] for run in results)
                ax.bar(x, value, width, color=f"C{r}", hatch=hatch, alpha=1 if hatch is None else 0.5,
                       label=f"rank {r}, " + ("logical peak" if j == 0 else "RSS rise") if i == 0 else None)  # fmt: skip
        if failed:
            ax.text(i, 0, "failed", ha="center", va="bottom", rotation=90)
    ax.set_xticks(range(len(runs)), [f"({mode}) {SHORT[mode]}" for mode in runs], fontsize=8)
    ax.set(ylabel="memory while loading + sharding, MB")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=None, help="default: /tmp/hf_dsv4_bench_<layout>")
    parser.add_argument(
        "--layout", choices=["hub", "release", "flash"], default="hub", help="the checkpoint built if absent"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--modes", default="abc")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--repeats", type=int, default=5, help="runs per mode (interleaved); the table shows medians")
    parser.add_argument("--read_budget_mb", type=float, default=16.0, help="mode (g): rank 0's read budget")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hf_dsv4_bench_out"))
    parser.add_argument("--plot", type=Path, default=None, help="draw each rank's peaks per mode into this PNG")
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ckpt is None:
        args.ckpt = Path(
            {"hub": "/tmp/hf_dsv4_bench_ckpt", "release": "/tmp/hf_dsv4_bench_release"}.get(
                args.layout, "/tmp/hf_dsv4_flash_release"
            )
        )
    if args.worker:
        return worker(args.worker, str(args.ckpt), str(args.out), args.backend)
    os.environ["BENCH_READ_BUDGET_MB"] = str(args.read_budget_mb)  # the workers of mode (g) inherit it

    size_mb = build_checkpoint(args.ckpt, args.layout)
    print(f"machine: {machine()}")
    print(
        f"checkpoint: {size_mb:.0f} MB safetensors, {args.layout} layout ({args.ckpt}), {args.ranks} ranks, {args.backend}"
    )
    print(f"goals for (c): non-source rise <= {1.3 * size_mb / args.ranks:.0f} MB (1.3 x ckpt / world); source rise "
          "<= 1.1 x (a) rank 0; wall <= (a)")  # fmt: skip
    print("goals for (d)-(g) (streamed): every rank's rise <= 1.3 x (the model in its loaded dtype / world) + one "
          "decoder layer; wall <= (a); (e) wall <= 0.75 x (a)\n")  # fmt: skip
    print(
        f"{args.repeats} runs per mode, interleaved; medians (wall: slowest rank of a run), every run's wall in brackets\n"
    )
    print("| mode | " + " | ".join(f"rank {r} logical MB" for r in range(args.ranks)) + " | "
          + " | ".join(f"rank {r} RSS rise MB" for r in range(args.ranks))
          + " | wall s | CPU s (all ranks) | page faults (all ranks) | note |")  # fmt: skip
    print("|---" * (2 * args.ranks + 5) + "|")
    runs = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for i, mode in enumerate(args.modes):
            port = 29500 + 17 * (i + len(args.modes) * repeat)
            runs[mode].append(run_mode(mode, args.ckpt, args.ranks, args.backend, args.out / mode, port, args.timeout))
    for mode, results in runs.items():
        errors = {r["error"] for run in results for r in run if r["error"]}
        rise_cells = " | ".join(
            "-" if errors else f"{statistics.median(run[r][field] for run in results):,.0f}"
            for field in ("logical_mb", "rise_mb")
            for r in range(args.ranks)
        )
        walls = [max(r["wall_s"] for r in run) for run in results] if not errors else []
        wall = f"{statistics.median(walls):.2f} [{', '.join(f'{w:.2f}' for w in walls)}]" if walls else "-"
        cpu = f"{statistics.median(sum(r['cpu_s'] for r in run) for run in results):.2f}" if walls else "-"
        faults = f"{statistics.median(sum(r['faults'] for r in run) for run in results) / 1000:.0f}k" if walls else "-"
        note = "; ".join(sorted(errors)) or "ok"
        if walls and all("load_s" in r for run in results for r in run):  # the loading phase, on the slowest rank
            load = statistics.median(max(r["load_s"] for r in run) for run in results)
            note += f"; from_pretrained {load:.2f} s, then sharding {statistics.median(walls) - load:.2f} s"
        print(f"| ({mode}) {MODES[mode]} | {rise_cells} | {wall} | {cpu} | {faults} | {note} |", flush=True)
    if args.plot:
        title = f"{machine()}\n{size_mb:.0f} MB {args.layout} checkpoint, {args.ranks} ranks, median of {args.repeats}"
        plot(runs, args.ranks, title, args.plot)


if __name__ == "__main__":
    main()
