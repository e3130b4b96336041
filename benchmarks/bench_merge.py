"""Peak memory and wall time of merging a LoRA adapter into a DeepSeek-V4 base and writing the merged checkpoint.

    python benchmarks/bench_merge.py          # bench_load.py's ~1 GB bf16 Hub-layout checkpoint, adapter `all` r=16
    python benchmarks/bench_merge.py --layout release

(m) hf_dsv4: `merge_adapter(base, adapter, out)`, one decoder layer at a time (release: dequantized on the way);
(s) stock peft: `from_pretrained(base)` + `PeftModel.from_pretrained` + `merge_and_unload()` + `save_pretrained(out)`.
Each in its own process (`benchmarks/_memory.py`), run twice: first untracked, for the wall time and the peak RSS rise
(VmHWM minus VmRSS just before, under default glibc: it includes freed memory glibc keeps), then under torch's memory
tracker for the logical peak of live tensors (tensors made by torch ops in the main thread: what a GPU would hold);
the two merged checkpoints are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import build_checkpoint, machine  # noqa: E402
from _memory import MB, live_tensors, reset_rss_peak, rss_rise_mb  # noqa: E402


def make_adapter(base: Path, folder: Path, targets: str) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_dsv4.training.lora import dsv4_lora_config

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = get_peft_model(model, dsv4_lora_config(r=16, alpha=32, targets=targets))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)


def worker(mode: str, base: str, adapter: str, out: str) -> None:
    import torch

    if mode == "m":
        from hf_dsv4 import merge_adapter
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

    def merge(folder: str) -> None:
        if mode == "m":
            merge_adapter(base, adapter, folder, dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(folder)

    baseline = reset_rss_peak()
    start = time.perf_counter()
    merge(out)
    wall, rise = time.perf_counter() - start, rss_rise_mb(baseline)
    with live_tensors() as live:  # a second time, tracked: its dispatch hook is in neither figure above
        merge(out + "_tracked")
    print(json.dumps({"logical_mb": live.rise / MB, "rise_mb": rise, "wall_s": wall}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="hub", choices=["hub", "release"])
    parser.add_argument("--targets", default="all")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hf_dsv4_bench_merge"))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    base = Path("/tmp/hf_dsv4_bench_ckpt" if args.layout == "hub" else "/tmp/hf_dsv4_bench_release")
    size = build_checkpoint(base, args.layout)
    adapter = args.out / f"adapter_{args.layout}_{args.targets}"
    if not (adapter / "adapter_model.safetensors").exists():
        make_adapter(base, adapter, args.targets)
    print(f"machine: {machine()}\nbase: {base} ({args.layout} layout, {size:,.0f} MB on disk), adapter "
          f"'{args.targets}' r=16, merged in bf16\n")  # fmt: skip
    print("| mode | logical peak MB | peak RSS rise MB | wall s |")
    print("| --- | ---: | ---: | ---: |")
    outs = {}
    for mode, label in (("m", "hf_dsv4 merge_adapter (one layer at a time)"), ("s", "stock peft merge_and_unload")):
        outs[mode] = args.out / f"merged_{mode}"
        done = subprocess.run([sys.executable, __file__, "--worker", mode, str(base), str(adapter), str(outs[mode])],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            print(f"| {label} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {result['logical_mb']:,.0f} | {result['rise_mb']:,.0f} | {result['wall_s']:.1f} |")
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                found |= {k: f.get_tensor(k) for k in f.keys()}
        return found

    if all((folder / "config.json").exists() for folder in outs.values()):
        import torch

        a, b = tensors(outs["m"]), tensors(outs["s"])
        same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        print(f"\nthe two merged checkpoints hold the same tensors, bit for bit: {same} ({len(a)} tensors)")


if __name__ == "__main__":
    main()
