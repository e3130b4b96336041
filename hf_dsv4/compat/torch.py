"""torch's part of the fence: the private names of torch that hf_dsv4 relies on (fences `torch` and `torch.tools`) and
the functions that reach them. A quantized weight (`hf_dsv4.sharding.quantized.QuantizedWeight`) is a wrapper tensor
subclass; packed rows see through traced tensors; the benchmarks and the Flash rehearsal measure with torch's memory
trackers and fake tensors. `import torch` here is torch itself (imports are absolute).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import Internal, require

# torch's part of `hf_dsv4.compat.FENCE`: fence name -> (tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    "torch": (">=2.13,<2.16", (  # else public APIs only (FSDP2, DCP, DTensor); the range is the tested one
        Internal(
            "torch._C:DisableTorchFunctionSubclass",
            why="a quantized weight's `__torch_function__` runs the op itself, results left as they are (the default "
            "would turn every result into the subclass)",
        ),
        Internal(
            "torch._ops:OpOverload.__init__",
            assigned="_schema",
            why="a quantized weight refuses the ops that write into their arguments (peft's merge): the op's schema",
        ),
        Internal(
            "torch.utils._python_dispatch:is_traceable_wrapper_subclass",
            why="a quantized weight implements that protocol (`__tensor_flatten__` / `__tensor_unflatten__`), so "
            "torch's memory tracker counts its bytes and parametrize swaps it instead of `set_`",
        ),
        Internal(
            "torch:Tensor._make_wrapper_subclass",
            why="a quantized weight is a tensor of the weight's shape and dtype that holds its bytes (torchao's "
            "pattern for NF4 / float8 weights; `hf_dsv4.sharding.quantized.QuantizedWeight`)",
        ),
        Internal(
            "torch._subclasses.fake_tensor:is_fake", ("x",),
            why="packed rows are read from position values: a traced (fake) tensor has none (the Flash rehearsal)",
        ),
    )),
    "torch.tools": (">=2.13,<2.16", (  # what the benchmarks and the Flash rehearsal measure with, never training
        Internal(
            "torch.distributed._tools.mem_tracker:MemTracker.get_tracker_snapshot", ("type",),
            why="the logical peak of live tensors, by category (parameters, gradients, activations, optimizer)",
        ),
        Internal("torch.distributed._tools.mem_tracker:MemTracker.track_external", why="tensors made before"),
        Internal("torch.distributed._tools.mem_tracker:MemTracker.reset_mod_stats", (), why="one step after another"),
        Internal(
            "torch.distributed._tools.fsdp2_mem_tracker:FSDPMemTracker.__init__", ("mod", "optm"),
            why="the same, with FSDP2's all-gathered and reduce-scattered buffers counted apart",
        ),
        Internal("torch._subclasses.fake_tensor:FakeTensorMode", why="the rehearsal traces without allocating"),
        Internal("torch.testing._internal.distributed.fake_pg:FakeStore", why="N ranks in one process"),
    )),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- tensors


def make_wrapper_subclass(cls: type, like: Any, device: Any) -> Any:
    """A tensor of subclass `cls` with `like`'s shape, strides and dtype on `device`, holding no storage of its own
    (the subclass holds its data: `hf_dsv4.sharding.quantized.QuantizedWeight`)."""
    import torch

    return torch.Tensor._make_wrapper_subclass(
        cls, like.shape, strides=like.stride(), storage_offset=like.storage_offset(), dtype=like.dtype,
        device=device, requires_grad=False,
    )  # fmt: skip


def writes_into_arguments(op: Any) -> bool:
    """Whether the aten operator `op` writes into one of its arguments (in place or `out=`)."""
    return op._schema.is_mutable


def subclass_functions_disabled() -> Any:
    """A context in which tensor subclasses' `__torch_function__` is off: a subclass's own `__torch_function__`
    calls the op in it (as torch's wrapper subclasses do)."""
    import torch

    return torch._C.DisableTorchFunctionSubclass()


# ---------------------------------------------------------------------------------------------------- autograd


def is_fake(tensor: Any) -> bool:
    """Whether `tensor` is a fake tensor (shapes without values: traced under `FakeTensorMode`)."""
    from torch._subclasses.fake_tensor import is_fake as fake

    return fake(tensor)


# ------------------------------------------------------------------------------------------------------- tools


def memory_tracker(model: Any = None, optimizer: Any = None, existing: Sequence[Any] = ()) -> Any:
    """torch's tracker of live tensors (a context manager): FSDP2's (`FSDPMemTracker`, which counts all-gathered
    and reduce-scattered buffers apart) for a model with FSDP2 groups, else the plain `MemTracker`.

    Args:
        model: the module whose parameters, gradients and buffers are tracked from before the tracker is entered.
        optimizer: the optimizer whose states are tracked likewise.
        existing: other tensors made before, tracked likewise (plain tracker only).

    Returns:
        The tracker, to be entered (`with`).

    Raises:
        ValueError: `existing` tensors with an FSDP2 model (its tracker takes the model and optimizer alone).
    """
    require("torch.tools")
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if model is not None and isinstance(model, FSDPModule):
        if existing:
            raise ValueError("memory_tracker: no `existing` tensors with an FSDP2 model (its tracker takes the model)")
        return FSDPMemTracker(model, optimizer)
    tracker = MemTracker()
    tracker.track_external(*[x for x in (model, optimizer, *existing) if x is not None])
    return tracker


def tracker_peak(tracker: Any) -> dict[str, dict[str, int]]:
    """A tracker's peak bytes per device ("cpu", "cuda:0") and category (lower-case names: "param", "grad", "act",
    "temp", "opt", "buffer", "oth", "total"; FSDP2's "all_gather", "reduce_scatter", ...)."""
    snapshot = tracker.get_tracker_snapshot("peak")
    return {
        str(device): {getattr(k, "name", str(k)).lower(): int(v) for k, v in categories.items()}
        for device, categories in snapshot.items()
    }


def end_of_step(tracker: Any) -> None:
    """Let a tracker see the next step (it refuses a module's second forward otherwise)."""
    tracker.reset_mod_stats()


def fake_tensor_mode() -> Any:
    """A `FakeTensorMode`: tensors with shapes, dtypes and devices but no storage."""
    require("torch.tools")
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_store() -> Any:
    """torch's fake process-group store: `init_process_group("fake", store=fake_store(), rank=r, world_size=n)`
    makes N ranks in one process whose collectives return without moving data."""
    require("torch.tools")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()
