"""`benchmarks/gpu_day_one.py --tiny`: the first GPU node's one command, run on 2 CPU ranks (gloo) as CI runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
ROWS = ["machine", "checkpoint", "loading", "training", "exactness vs dequantized base",
        "resume from sharded checkpoint", "export", "tokens/s", "MFU", "peak memory per rank", "rehearsal peak per rank"]  # fmt: skip


def day_one(ckpt: Path, out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python benchmarks/gpu_day_one.py --tiny` on `ckpt` (written there if missing), its runs in `out`."""
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_day_one.py"), "--tiny", "--ckpt", str(ckpt), "--out",
               str(out), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_day_one_tiny_prints_one_table_and_the_quantized_step_equals_the_dequantized_one(tmp_path):
    out = tmp_path / "out"
    done = day_one(tmp_path / "ckpt", out, "--json", str(tmp_path / "table.json"), timeout=570)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert lines[:2] == ["| gpu_day_one | result |", "| --- | --- |"]
    assert [line.split(" | ", 1)[0].removeprefix("| ") for line in lines[2:]] == ROWS  # one table, these rows
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["passed"] is True
    cells = table["table"]
    assert [f"| {row} | {cells[row]} |" for row in ROWS] == lines[2:]

    # step 2: over the base kept quantized (resumed from step 1's sharded checkpoint) the very loss of the base that
    # transformers dequantized to bf16
    exact = re.fullmatch(r"step 2 loss (\S+) kept quantized vs (\S+) dequantized to bf16: bit-equal", cells[ROWS[4]])
    assert exact and exact[1] == exact[2] and 0 < float(exact[1]) < 20
    for run, step in (("dequantized", 1), ("quantized", 2)):  # DCP optimizer shards + the adapter, per checkpoint
        checkpoint = out / run / f"checkpoint-{step}"
        assert (checkpoint / "optimizer_0" / ".metadata").is_file() and (checkpoint / "adapter_config.json").is_file()
    assert "streamed, readers=all, read budget 64 KB; kept quantized" in cells["loading"]
    assert cells["MFU"] == "n/a (CPU)" and cells["tokens/s"].startswith("n/a kept quantized")
    peak = re.match(r"(\d+\.\d+(?:e-\d+)?) GiB kept quantized \(max over ranks; live tensors", cells[ROWS[9]])
    assert peak and 0.001 < float(peak[1]) < 1

    # the exported adapter: DeepSeek-native names, routed experts one by one
    count = int(re.fullmatch(r"vLLM layout: (\d+) tensors \(hf_dsv4.export_adapter\)", cells["export"])[1])
    with safe_open(str(out / "vllm" / "adapter_model.safetensors"), "pt") as exported:
        names = list(exported.keys())
    assert len(names) == count
    assert any(".ffn.experts.0.w1." in name for name in names) and any(".attn.wq_a." in name for name in names)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_day_one_stops_with_the_ranks_error_when_the_checkpoint_is_broken(tmp_path):
    from hf_dsv4.testing import build_release_dsv4

    ckpt = build_release_dsv4(tmp_path / "ckpt")
    broken = sorted(ckpt.glob("model-*.safetensors"))[1]
    broken.write_bytes(broken.read_bytes()[:1000])  # a shard cut short: every rank's streamed read fails
    done = day_one(ckpt, tmp_path / "out", "--timeout", "240", timeout=280)
    assert done.returncode == 1 and "| gpu_day_one |" not in done.stdout
    stopped = "RuntimeError: dequantized: accelerate launch exited with 1 (0 of 2 ranks finished); its log"
    assert any(line.startswith(stopped) for line in done.stderr.splitlines())
    assert f"{broken}: not a readable safetensors file" in done.stderr  # the rank's own error, in the log's tail
