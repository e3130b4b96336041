"""Forward + backward of one DeepSeek-V4 decoder layer's attention path, stock transformers vs hf_dsv4's sparse
attention (`enable_sparse_attention`): peak memory rise and wall time per layer type and sequence length, in one run.

    python benchmarks/bench_attention.py                                   # CPU, fp32, L = 1k..16k, stock to 8k
    python benchmarks/bench_attention.py --types csa --lengths 512 1024 --chunk-size 128
    python benchmarks/bench_attention.py --scope model                     # the whole one-layer model (+ hc, MoE)
    python benchmarks/bench_attention.py --device cuda --stock-max-len 16384 --json /tmp/bench_attention.json
    python benchmarks/bench_attention.py --flash                           # Flash at 4k..32k tokens per GPU
    python benchmarks/bench_attention.py --lengths 1024 2048 4096 8192 --stock-max-len 4096 --plot docs/images/attention_memory.png

The model: a one-layer `DeepseekV4ForCausalLM` (`tiny_dsv4_config` with 16 heads of 128, hidden 1024, q rank 512,
4 output groups of rank 256, hc_mult 4, a window of 128, an indexer of 16 heads of 128 keeping the top 512 entries,
compression 4 (CSA) / 128 (HCA), a 2-expert MoE of width 256), one model per layer type (`--types sliding csa hca`),
seed 0; init leaves the attention sinks and the compressors' position biases at zero, they are drawn from
N(0, 0.5) so the softmax sees them. Batch 1, `--dtype` float32 by default. Input `x`: random `[1, L, 1024]`.

What one measurement runs (`x` and every parameter require grad: full fine-tuning, so the attention's backward and
the weight gradients run), then `(out.float() @ probe).mean()` backward (`probe`: a fixed random vector):

--scope attention (default): the attention path as the model forward runs it: the model's mask
    (`create_sliding_window_causal_mask(config, x, attention_mask=ones)`: stock builds the `L x L` mask here, sparse
    a `SparseMask`), the model's rope, then `layers[0].self_attn(x, ...)` (projections, compressor and indexer,
    attention, output projection), no cache;
--scope model: the whole one-layer model, `model.model(inputs_embeds=x, attention_mask=ones, use_cache=False)`, which
    adds the hyper-connections (4 residual streams), norms and the MoE: memory linear in L, the same for both.
    (`use_cache=False` for both: without it stock builds a cache from `config.use_cache` even in training.)

"sparse" is the same model after `enable_sparse_attention(model, chunk_size=--chunk-size)`.

Each (type, L, implementation) runs in a fresh process, one at a time, with `--threads` threads and glibc as it
comes. After building the model and the inputs it runs forward + backward once under torch's memory tracker
(`benchmarks/_memory.py`: `hf_dsv4.compat.memory_tracker`) and reports two peaks, each as a rise over the model's
parameters and the inputs: the logical peak of live tensors (activations, saved tensors, gradients, transients: what
a GPU would hold; the headline column) and, beside it, the peak RSS rise (VmHWM reset to the current RSS just before
the run, minus that RSS; it includes freed memory glibc keeps). On CUDA the second figure is max_memory_allocated minus
memory_allocated before the run. The time is the wall time of a second forward + backward, untracked (the tracker's
dispatch hook slows the first; its time is kept in the JSON as `tracked_s`). Stock's memory is quadratic in L: stock
runs above `--stock-max-len` (CPU default 8192) are skipped and shown with the peak projected quadratically from the
largest measured L; a stock run whose projected RSS (x1.25) exceeds MemAvailable is skipped too, and every CPU worker
runs under RLIMIT_DATA = MemAvailable - 1 GiB, so an allocation that does not fit fails in the worker ("OOM")
instead of pulling the machine into swap or the OOM killer. A crashed or killed worker is reported, not hidden.
Each pair's loss and input-gradient norm are compared (stock and sparse compute the same function).
`--plot out.png` draws the logical peak against L, stock and sparse, one panel per layer type (needs matplotlib:
`pip install -e ".[docs]"`).

--flash: what it means for DeepSeek-V4-Flash. One full-width Flash decoder layer per layer type (the real config:
hidden 4096, 64 heads of 512, hc_mult 4, indexer 64 x 128 top-512; its MoE with 8 routed experts instead of 256, top-6
as released: what a layer saves depends on the tokens routed, not on the expert count), bf16, frozen weights (LoRA's
case: input gradients only), the whole layer forward (`model.model(inputs_embeds=x)`) with autograd's saved-tensor
hooks counting the bytes of the distinct storages saved for backward (parameters excluded), at 1k and 2k tokens,
stock and sparse. Then per GPU for LoRA on one node of 8 x 80 GB / 8 x 141 GB: `bench_quantized.py --projection`'s
parts (keep_quantized base, adapter, each layer's input kept by activation checkpointing) plus one layer's saved
tensors during its recompute, at 4k..32k tokens (stock: quadratic from its two measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import machine  # noqa: E402
from _memory import MB, live_tensors, reset_rss_peak, rss_rise_mb, status_kb  # noqa: E402

TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
IMPLS = ("stock", "sparse")
OVERRIDES = dict(
    vocab_size=256,
    hidden_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=1,
    mlp_layer_types=["moe"],
    n_routed_experts=2,
    num_experts_per_tok=1,
    n_shared_experts=1,
    num_attention_heads=16,
    head_dim=128,
    q_lora_rank=512,
    o_groups=4,
    o_lora_rank=256,
    hc_mult=4,
    sliding_window=128,
    index_n_heads=16,
    index_head_dim=128,
    index_topk=512,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    max_position_embeddings=65536,  # default rope (no yarn) for both rope types: valid at any length
)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise KeyError("MemAvailable")


# ---------------------------------------------------------------------------------------------- one measurement


def build(layer_type: str, dtype):
    """The one-layer model of `layer_type`, seed 0, sinks and position biases drawn from N(0, 0.5)."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    from hf_dsv4.testing.model import tiny_dsv4_config

    torch.manual_seed(0)
    config = tiny_dsv4_config(**OVERRIDES, layer_types=[layer_type])
    model = DeepseekV4ForCausalLM._from_config(config, dtype=dtype)  # keeps transformers' fp32 modules in fp32
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                param.normal_(0.0, 0.5)
    return model


def attention_path(model):
    """--scope attention as one module: the model's mask and rope, then `layers[0].self_attn` (projections,
    compressor and indexer, attention, output projection). One root call, under which torch's memory tracker accepts
    the rope module's two calls."""
    import torch
    from transformers.masking_utils import create_sliding_window_causal_mask

    class AttentionPath(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, embeds, mask, positions):
            causal = create_sliding_window_causal_mask(
                config=model.config, inputs_embeds=embeds, attention_mask=mask, cache=None, position_ids=positions
            )
            rope = {
                kind: model.model.rotary_emb(embeds, position_ids=positions, layer_type=kind)
                for kind in ("main", "compress")
            }
            attention = model.model.layers[0].self_attn
            return attention(embeds, position_embeddings=rope, position_ids=positions, attention_mask=causal)[0]

    return AttentionPath()


def worker(args: argparse.Namespace) -> None:
    import torch

    layer_type, length, impl = TYPES[args.one[0]], int(args.one[1]), args.one[2]
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(layer_type, dtype).to(device).train()
    if impl == "sparse":
        from hf_dsv4.modeling import enable_sparse_attention

        enable_sparse_attention(model, chunk_size=args.chunk_size)
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, length, model.config.hidden_size, generator=generator)
    embeds = embeds.to(device=device, dtype=dtype).requires_grad_()
    probe = torch.randn(model.config.hidden_size, generator=generator).to(device)  # loss: a random projection
    mask = torch.ones(1, length, dtype=torch.long, device=device)
    result: dict = {"type": args.one[0], "length": length, "impl": impl, "error": None}
    path, positions = attention_path(model), torch.arange(length, device=device).unsqueeze(0)

    def step() -> tuple[float, float]:
        """Forward + backward from fresh gradients: (wall seconds, CPU seconds of the process, all threads)."""
        model.zero_grad(set_to_none=True)
        embeds.grad = None
        tick, cpu = time.perf_counter(), _cpu_s()
        if args.scope == "model":
            hidden = model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            hidden = path(embeds, mask, positions)
        loss = (hidden.float() @ probe).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["loss"], result["grad_norm"] = loss.item(), embeds.grad.float().norm().item()
        return time.perf_counter() - tick, _cpu_s() - cpu

    if device.type == "cpu" and args.data_limit_mb:
        limit = (status_kb("VmData") * 1024) + int(args.data_limit_mb * MB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        else:
            baseline = reset_rss_peak()
        with live_tensors(model, existing=[embeds, probe, mask, positions], device=str(embeds.device)) as live:
            result["tracked_s"] = step()[0]
        result["peak_mb"] = live.rise / MB
        if device.type == "cuda":
            result["process_mb"] = (torch.cuda.max_memory_allocated(device) - baseline) / MB
        else:
            result["process_mb"] = rss_rise_mb(baseline)
        result["time_s"], result["cpu_s"] = step()  # untracked: the time without the tracker's dispatch hook
        result["finite"] = bool(torch.isfinite(torch.tensor([result["loss"], result["grad_norm"]])).all())
    except (torch.OutOfMemoryError, MemoryError) as exc:
        result["error"] = f"OOM ({type(exc).__name__})"
    except RuntimeError as exc:  # the CPU allocator's failure under RLIMIT_DATA
        message = str(exc).splitlines()[0]
        result["error"] = "OOM (allocation failed)" if "allocate" in message else f"RuntimeError: {message[:160]}"
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver


def run_one(args: argparse.Namespace, kind: str, length: int, impl: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    limit = max(_mem_available_mb() - 1024, 0) if args.device == "cpu" else 0
    forwarded = ["--scope", args.scope, "--device", args.device, "--dtype", args.dtype,
                 "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
                 "--data-limit-mb", str(limit)]  # fmt: skip
    base = {"type": kind, "length": length, "impl": impl}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", kind, str(length), impl, *forwarded],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout ({args.timeout:.0f} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1].removeprefix("RESULT "))
    if proc.returncode < 0:  # killed by a signal: SIGKILL is the kernel's OOM killer
        return {**base, "error": "OOM (killed)" if proc.returncode == -9 else f"killed by signal {-proc.returncode}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**base, "error": f"exit {proc.returncode}: {tail[:160]}"}


def _measured(results: list[dict], kind: str, impl: str) -> dict[int, dict]:
    return {r["length"]: r for r in results if r["type"] == kind and r["impl"] == impl and r.get("peak_mb") is not None}


def _projected_mb(results: list[dict], kind: str, length: int, field: str = "peak_mb") -> tuple[float, int] | None:
    """Stock's `field` at `length`, quadratic from the largest measured shorter length (and that length)."""
    done = {n: r for n, r in _measured(results, kind, "stock").items() if n < length}
    if not done:
        return None
    largest = max(done)
    return done[largest][field] * (length / largest) ** 2, largest


def measure(args: argparse.Namespace) -> list[dict]:
    results: list[dict] = []
    for kind in args.types:
        for length in args.lengths:
            for impl in ("sparse", "stock"):
                projection = _projected_mb(results, kind, length) if impl == "stock" else None
                skip = None
                if impl == "stock" and length > args.stock_max_len:
                    skip = "over --stock-max-len"
                elif impl == "stock" and projection and args.device == "cpu":
                    available = _mem_available_mb()
                    if 1.25 * _projected_mb(results, kind, length, "process_mb")[0] > available:
                        skip = f"memory: {available / 1024:.1f} GB available"
                if skip:
                    result = {"type": kind, "length": length, "impl": impl, "error": None, "skipped": skip}
                    if projection:
                        result["projected_mb"], result["projected_from"] = projection
                else:
                    result = run_one(args, kind, length, impl)
                results.append(result)
                print(f"  {kind:7s} L={length:6d} {impl:6s} {_describe(result)}", file=sys.stderr, flush=True)
    return results


def _describe(result: dict) -> str:
    if result.get("skipped"):
        projected = result.get("projected_mb")
        return f"skipped ({result['skipped']})" + (f", projected {projected / 1024:.1f} GB" if projected else "")
    if result.get("error"):
        return result["error"]
    return (f"peak {result['peak_mb']:,.0f} MB (RSS {result['process_mb']:,.0f}), {result['time_s']:.2f} s "
            f"({result['cpu_s']:.1f} CPU s; tracked {result['tracked_s']:.2f} s)")  # fmt: skip


def _peak_cell(result: dict | None, field: str = "peak_mb") -> str:
    if result is None:
        return "—"
    if result.get("skipped"):
        projected = result.get("projected_mb")
        if projected is None or field != "peak_mb":
            return f"skipped ({result['skipped']})" if projected is None else "skipped"
        return f"skipped (projected {projected / 1024:,.1f} GB)"
    if result.get("error"):
        return result["error"]
    return f"{result[field]:,.0f}"


def _time_cell(result: dict | None, field: str = "time_s") -> str:
    if result is None or result.get(field) is None:
        return "—"
    return f"{result[field]:.2f}"


def plot(results: list[dict], args: argparse.Namespace, title: str, path: Path) -> None:
    """Peak memory (logical peak rise) against sequence length, stock vs sparse, one panel per layer type; stock's
    skipped lengths as its quadratic projection (open markers, dotted)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.types), figsize=(4 * len(args.types), 3.6), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], args.types):
        for impl, style in (("stock", "o-"), ("sparse", "s-")):
            measured = _measured(results, kind, impl)
            ax.plot(sorted(measured), [measured[n]["peak_mb"] for n in sorted(measured)], style, label=impl)
        projected = sorted((r["length"], r["projected_mb"]) for r in results
                           if r["type"] == kind and r["impl"] == "stock" and r.get("projected_mb"))  # fmt: skip
        if projected:  # dotted on from the largest measured stock length
            stock = _measured(results, kind, "stock")
            start = [(max(stock), stock[max(stock)]["peak_mb"])] if stock else []
            ax.plot(*zip(*start, *projected), "o:", mfc="none", color="C0", label="stock, projected (quadratic)")
        ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", title=kind)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(args.lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in args.lengths])
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("peak memory rise, MB (live tensors)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def tables(results: list[dict], args: argparse.Namespace) -> list[str]:
    """Print the two tables; return the goal lines."""
    index = {(r["type"], r["length"], r["impl"]): r for r in results}
    other = "RSS" if args.device == "cpu" else "allocated"
    print(f"| layer type | L | stock peak MB | sparse peak MB | ratio | stock {other} MB | sparse {other} MB | "
          f"{other} ratio | stock s | sparse s | speedup | stock CPU s | sparse CPU s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in args.types:
        for length in args.lengths:
            stock, sparse = index.get((kind, length, "stock")), index.get((kind, length, "sparse"))
            ratio = other_ratio = speedup = "—"
            if stock and sparse and stock.get("peak_mb") is not None and sparse.get("peak_mb") is not None:
                ratio = f"{sparse['peak_mb'] / stock['peak_mb']:.3f}x"
                other_ratio = f"{sparse['process_mb'] / stock['process_mb']:.3f}x"
                speedup = f"{stock['time_s'] / sparse['time_s']:.2f}x"
            elif stock and sparse and stock.get("projected_mb") and sparse.get("peak_mb") is not None:
                ratio = f"{sparse['peak_mb'] / stock['projected_mb']:.3f}x (projected)"
            cells = [_peak_cell(stock), _peak_cell(sparse), ratio, _peak_cell(stock, "process_mb"),
                     _peak_cell(sparse, "process_mb"), other_ratio, _time_cell(stock), _time_cell(sparse), speedup,
                     _time_cell(stock, "cpu_s"), _time_cell(sparse, "cpu_s")]  # fmt: skip
            print(f"| {kind} | {length} | {' | '.join(cells)} |")
    tracked = [r["tracked_s"] / r["time_s"] for r in results if r.get("tracked_s") and r.get("time_s")]
    print(f"\npeak: the logical peak of live tensors, rise over the model and inputs (what a GPU would hold); {other}: "
          f"{'the process peak RSS rise under default glibc (includes freed memory glibc keeps)' if other == 'RSS' else 'max_memory_allocated rise'}"
          f". speedup: stock s / sparse s (wall) of a second, untracked run (the tracked one took "
          f"{min(tracked, default=0):.2f}-{max(tracked, default=0):.2f}x as long). CPU s: the worker's user + system "
          "seconds over the same run, all threads (steadier than the wall time on a shared machine).\n")  # fmt: skip
    print("Growth per doubling of L (peak(L) / peak(L/2); time(L) / time(L/2)):\n")
    print("| layer type | L | sparse peak | stock peak | sparse time | stock time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    growth: dict[str, list[float]] = {}
    for kind in args.types:
        for length in args.lengths:
            if length // 2 not in args.lengths or length % 2:
                continue
            cells = []
            for field in ("peak_mb", "time_s"):
                for impl in IMPLS[::-1]:
                    now, before = index.get((kind, length, impl)), index.get((kind, length // 2, impl))
                    if now and before and now.get(field) is not None and before.get(field) is not None:
                        value = now[field] / before[field]
                        cells.append(f"{value:.2f}x")
                        if field == "peak_mb" and impl == "sparse":
                            growth.setdefault(kind, []).append(value)
                    else:
                        cells.append("—")
            print(f"| {kind} | {length} | {' | '.join(cells)} |")
    goals = []
    for kind in args.types:
        stock, sparse = index.get((kind, 4096, "stock")), index.get((kind, 4096, "sparse"))
        if stock and sparse and stock.get("peak_mb") is not None and sparse.get("peak_mb") is not None:
            ratio = sparse["peak_mb"] / stock["peak_mb"]
            goals.append(f"{kind}: sparse peak at L=4096 {ratio:.3f}x stock's (goal <= 0.15x): "
                         f"{'met' if ratio <= 0.15 else 'MISSED'}")  # fmt: skip
        if growth.get(kind):
            worst = max(growth[kind])
            goals.append(f"{kind}: sparse peak growth per doubling at most {worst:.2f}x (goal <= 2.2x): "
                         f"{'met' if worst <= 2.2 else 'MISSED'}")  # fmt: skip
    for kind in args.types:  # stock and sparse compute the same function: same loss, same input gradient
        for length in args.lengths:
            stock, sparse = index.get((kind, length, "stock")), index.get((kind, length, "sparse"))
            if stock and sparse and stock.get("loss") is not None and sparse.get("loss") is not None:
                worst = max(abs(sparse[f] - stock[f]) / max(abs(stock[f]), 1e-6) for f in ("loss", "grad_norm"))
                if worst > 1e-4 or not (stock.get("finite") and sparse.get("finite")):
                    goals.append(f"{kind} L={length}: stock and sparse differ (relative {worst:.1e}) or not finite")
    return goals


# ---------------------------------------------------------------------------------------------- Flash projection


def flash_saved_bytes(layer_type: str, impl: str, lengths: list[int]) -> dict[int, int]:
    """Bytes autograd saves for backward in one full-width Flash decoder layer (see --flash), per length."""
    import torch
    from _common import FIRST_CSA_TOPK, flash_slice_config
    from transformers import DeepseekV4ForCausalLM

    config = flash_slice_config(1, first=FIRST_CSA_TOPK)
    config.layer_types, config.n_routed_experts, config.vocab_size = [layer_type], 8, 256
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM._from_config(config, dtype=torch.bfloat16).train().requires_grad_(False)
    if impl == "sparse":
        from hf_dsv4.modeling import enable_sparse_attention

        enable_sparse_attention(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    for length in lengths:
        storages.clear()
        embeds = torch.randn(1, length, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(1, length, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        saved[length] = sum(storages.values())
    return saved


FLASH_LENGTHS = [1024, 2048]


def flash(args: argparse.Namespace) -> None:
    from bench_quantized import projection_rows

    measured = FLASH_LENGTHS
    per_type = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for kind in args.types:
        for impl in IMPLS:  # each in a fresh process: one model and its saved tensors at a time
            command = [sys.executable, __file__, "--flash-one", kind, impl, "--threads", str(args.threads)]
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise SystemExit(f"--flash {kind} {impl}: exit {proc.returncode}: {tail}")
            per_type[(kind, impl)] = {int(n): v for n, v in json.loads(lines[-1].removeprefix("RESULT ")).items()}
            sizes = ", ".join(f"L={n}: {v / 1e6:,.0f} MB" for n, v in per_type[(kind, impl)].items())
            print(f"  {kind:7s} {impl:6s} saved {sizes}", file=sys.stderr, flush=True)
    print("One full-width DeepSeek-V4-Flash decoder layer, bf16, frozen weights: bytes saved for backward (MB):\n")
    print("| layer type | L | stock | sparse | sparse KB/token |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in args.types:
        for length in measured:
            stock, sparse = per_type[(kind, "stock")][length], per_type[(kind, "sparse")][length]
            print(f"| {kind} | {length} | {stock / 1e6:,.0f} | {sparse / 1e6:,.0f} | {sparse / length / 1e3:,.0f} |")

    def layer_bytes(impl: str, length: int) -> float:
        """The largest layer type's saved bytes at `length`: a L + b L^2 through the two measurements."""
        worst = 0.0
        for kind in args.types:
            (l1, s1), (l2, s2) = sorted(per_type[(kind, impl)].items())
            quad = (s2 / l2 - s1 / l1) / (l2 - l1)
            worst = max(worst, (s1 / l1 - quad * l1) * length + quad * length**2)
        return worst

    # bench_quantized's keep_quantized parts without activations (seq 0); each layer's input kept, per token (seq 1)
    fixed = sum(q for _, q, _ in projection_rows("all", seq=0)[0])
    per_token = sum(q for _, q, _ in projection_rows("all", seq=1)[0]) - fixed
    print(f"\nDeepSeek-V4-Flash LoRA 'all' r=16 on one node of 8 GPUs, keep_quantized, activation checkpointing, "
          f"per GPU (GB): {fixed / 1e9:.1f} before activations (bench_quantized.py --projection) + each layer's "
          f"input ({per_token / 1e6:.2f} MB/token) + one layer's saved tensors during its recompute:\n")  # fmt: skip
    print("| tokens per GPU | checkpoints | one layer, stock | one layer, sparse | total stock | total sparse | "
          "sparse fits |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for length in (4096, 8192, 16384, 32768, 65536):
        stock, sparse = layer_bytes("stock", length), layer_bytes("sparse", length)
        total_stock, total_sparse = fixed + per_token * length + stock, fixed + per_token * length + sparse
        fits = ", ".join(name for name, gb in (("80 GB", 80e9), ("141 GB", 141e9)) if total_sparse <= gb) or "no"
        print(f"| {length:,} | {per_token * length / 1e9:.1f} | {stock / 1e9:,.1f} | {sparse / 1e9:.1f} | "
              f"{total_stock / 1e9:,.0f} | {total_sparse / 1e9:.1f} | {fits} |")  # fmt: skip
    longest = 1024
    while fixed + per_token * (longest + 1024) + layer_bytes("sparse", longest + 1024) <= 80e9:
        longest += 1024
    print(f"\nsaved tensors only (one chunk's transients come on top: sparse, one CSA chunk of 256 queries x 512 picks: 849 MB measured on CPU; stock, another [64, L, L + T]"
          f" fp32 scores); sparse fits 8 x 80 GB up to ~{longest / 1e3:.0f}k tokens per GPU")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", choices=sorted(TYPES), default=list(TYPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--chunk-size", type=int, default=256, help="enable_sparse_attention(chunk_size=...)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    parser.add_argument("--stock-max-len", type=int, default=None, help="longest stock run (default: cpu 8192)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="draw peak memory vs L into this PNG (matplotlib)")
    parser.add_argument("--scope", choices=["attention", "model"], default="attention", help="what runs (see above)")
    parser.add_argument("--flash", action="store_true", help="Flash at 4k..32k tokens per GPU (see above), and exit")
    parser.add_argument("--flash-one", nargs=2, metavar=("TYPE", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=3, metavar=("TYPE", "L", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--data-limit-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        worker(args)
        return
    if args.flash_one:
        import torch

        torch.set_num_threads(args.threads)
        saved = flash_saved_bytes(TYPES[args.flash_one[0]], args.flash_one[1], FLASH_LENGTHS)
        print("RESULT " + json.dumps(saved), flush=True)
        return
    if args.flash:
        print(f"machine: {machine()}\n", flush=True)
        flash(args)
        return
    if args.stock_max_len is None:
        args.stock_max_len = 8192 if args.device == "cpu" else max(args.lengths)
    args.lengths = sorted(set(args.lengths))
    import torch
    import transformers

    header = f"machine: {machine()}, transformers {transformers.__version__}"
    if args.device == "cuda":
        header += f", {torch.cuda.get_device_name()}"
    setup = (f"scope {args.scope}: one DeepSeek-V4 decoder layer (16 heads x 128, hidden 1024, window 128, indexer "
             f"16 x 128 top-512, compression 4 / 128, hc_mult 4), {args.dtype}, batch 1, forward + backward (input and "
             f"weight grads), {args.device}, {args.threads} threads, sparse chunk {args.chunk_size}")  # fmt: skip
    print(f"{header}\n{setup}\n", flush=True)
    start = time.perf_counter()
    results = measure(args)
    wall = time.perf_counter() - start
    goals = tables(results, args)
    print(f"\nwall time of the run: {wall / 60:.1f} min")
    if goals:
        print("\n" + "\n".join(goals))
    if args.json:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"machine": header, "setup": setup, "platform": platform.platform(), "args": options, "wall_s": wall,
                  "results": results}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(
            results,
            args,
            f"{header}\n{args.scope} scope, {args.dtype}, forward + backward, sparse chunk {args.chunk_size}",
            args.plot,
        )


if __name__ == "__main__":
    main()
