"""Peak memory of a measured span, the two ways the benchmarks report it.

- logical peak: the most bytes of live tensors at any moment, from torch's memory tracker through `hf_dsv4.compat`'s
  fence (`memory_tracker`, `tracker_peak`, `end_of_step`): what a GPU would hold, independent of the allocator;
- RSS: the process's peak resident memory (Linux VmHWM, reset with `clear_refs`), under default glibc, so it also
  counts freed memory that glibc keeps in its heap.

Both are reported as a rise over what existed when the span began; the tracker sees tensors made by torch ops in the
thread that entered it, plus the model, optimizer and tensors named on entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MB = 2**20


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, VmData)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_rss_peak() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); return the current RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS")


def rss_rise_mb(baseline_kb: int) -> float:
    """The peak RSS since `reset_rss_peak()` returned `baseline_kb`, minus that baseline, in MB."""
    return (status_kb("VmHWM") - baseline_kb) / 1024


@dataclasses.dataclass
class LivePeak:
    """The logical peak of a `live_tensors` span on one device, in bytes; `rise` and `peak` are set when it ends."""

    tracker: Any
    at_entry: int
    peak: int = 0
    rise: int = 0
    by_category: dict[str, int] = dataclasses.field(default_factory=dict)


def _total(tracker: Any, device: str) -> dict[str, int]:
    from hf_dsv4 import compat

    return compat.tracker_peak(tracker).get(device, {})


@contextlib.contextmanager
def live_tensors(
    model: Any = None, optimizer: Any = None, existing: Sequence[Any] = (), device: str = "cpu"
) -> Iterator[LivePeak]:
    """Track live tensors over the `with` body: `model`, `optimizer` and the `existing` tensors are counted from entry
    (FSDP2's tracker for an FSDP2 model). Yields a `LivePeak` (pass its `tracker` to `hf_dsv4.compat.end_of_step`
    between steps); on exit its `peak` is the most bytes alive at once on `device` and `rise` that minus the bytes
    alive at entry."""
    from hf_dsv4 import compat

    with compat.memory_tracker(model, optimizer, existing) as tracker:
        result = LivePeak(tracker, at_entry=_total(tracker, device).get("total", 0))
        yield result
    result.by_category = _total(tracker, device)
    result.peak = result.by_category.get("total", 0)
    result.rise = result.peak - result.at_entry
