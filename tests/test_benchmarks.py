"""The benchmarks' memory helper (`benchmarks/_memory.py`): the logical peak of live tensors it reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from hf_dsv4 import compat

_SPEC = importlib.util.spec_from_file_location(
    "bench_memory", Path(__file__).resolve().parents[1] / "benchmarks" / "_memory.py"
)
memory = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)  # dataclasses look their module up
_SPEC.loader.exec_module(memory)


def test_live_tensors_peak_is_the_bytes_alive_at_once_and_rise_excludes_what_existed_before():
    model = torch.nn.Linear(8, 4, bias=False)  # 32 fp32 parameters: 128 bytes
    existing = torch.zeros(1000)  # 4,000 bytes
    with memory.live_tensors(model, existing=[existing]) as live:
        big = torch.empty(1024, 256)  # 1 MiB
        small = torch.empty(512, dtype=torch.float64)  # 4,096 bytes, alive with `big`: the peak
        del big
        later = torch.empty(100)  # 400 bytes, after `big` is freed: not at the peak
    assert live.at_entry == 128 + 4000
    assert live.rise == 2**20 + 4096
    assert live.peak == 128 + 4000 + 2**20 + 4096
    assert live.by_category["param"] == 128
    del small, later


def test_live_tensors_follows_a_module_over_two_steps_with_end_of_step_between():
    model = torch.nn.Linear(64, 32, bias=False)  # 8 KiB of weight
    inputs = torch.ones(16, 64)
    with memory.live_tensors(model, existing=[inputs]) as live:
        for step in range(2):
            if step:
                compat.end_of_step(live.tracker)  # without it the tracker refuses the second forward
            model(inputs).sum().backward()
    # the peak is in the second backward: the first step's gradient and the new one before it is accumulated into it
    # (8 KiB each), the loss and its gradient (one fp32 scalar each)
    assert live.by_category["grad"] == 64 * 32 * 4
    assert live.rise == 2 * 64 * 32 * 4 + 2 * 4
    assert live.at_entry == 64 * 32 * 4 + 16 * 64 * 4
