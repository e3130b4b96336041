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


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_day_one_tiny_prints_one_table_and_the_quantized_step_equals_the_dequantized_one(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_day_one.py"), "--tiny", "--ckpt", str(tmp_path / "ckpt"),
               "--out", str(out), "--json", str(tmp_path / "table.json")]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=570, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
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
    peak = re.match(
        r"(\d+\.\d+(?:e-\d+)?) GiB kept quantized \(max over ranks; live tensors", cells["peak memory per rank"]
    )
    assert peak and 0.001 < float(peak[1]) < 1

    # the exported adapter: DeepSeek-native names, routed experts one by one
    count = int(re.fullmatch(r"vLLM layout: (\d+) tensors \(hf_dsv4.export_adapter\)", cells["export"])[1])
    with safe_open(str(out / "vllm" / "adapter_model.safetensors"), "pt") as exported:
        names = list(exported.keys())
    assert len(names) == count
    assert any(".ffn.experts.0.w1." in name for name in names) and any(".attn.wq_a." in name for name in names)
