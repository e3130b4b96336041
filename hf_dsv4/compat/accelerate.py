"""accelerate's part of the fence: the private names of accelerate that hf_dsv4 relies on and the functions that reach
them (`hf_dsv4.training.DSV4Accelerator` prepares optimizers, registers sharded models and runs FSDP on CPU processes
through them). Its overrides of `_prepare_fsdp2` and `_prepare_cp` live in it; their upstream signatures are checked
here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from . import Internal

# accelerate's part of `hf_dsv4.compat.FENCE`: fence name -> (tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    "accelerate": (">=1.15,<1.17", (
        Internal("accelerate:Accelerator._prepare_fsdp2", ("args",), why="overridden: shard_model instead"),
        Internal(
            "accelerate:Accelerator._prepare_cp", ("args",), why="overridden: enable_context_parallel instead of torch's"
        ),
        Internal("accelerate:Accelerator._prepare_one", ("obj", "first_pass"), why="called for optimizers"),
        Internal("accelerate:Accelerator.__init__", assigned="_models", why="sharded models are registered there"),
        Internal("accelerate:PartialState._shared_state", why="FSDP on CPU processes"),
        Internal(
            "accelerate.parallelism_config:ParallelismConfig._validate_accelerator",
            ("accelerator",),
            why="checked once CPU processes are switched to FSDP (accelerate checks before, and refuses MULTI_CPU)",
        ),
    )),
}  # fmt: skip


def prepare_one(accelerator: Any, obj: Any, first_pass: bool = False) -> Any:
    """What `Accelerator.prepare` does to one non-model object (optimizer, scheduler, data loader)."""
    return accelerator._prepare_one(obj, first_pass=first_pass)


def register_prepared_model(accelerator: Any, model: Any) -> None:
    """Record `model` as prepared, as `Accelerator.prepare` does (saving, `unwrap_model` and `free_memory` read it)."""
    accelerator._models.append(model)


def set_process_distributed_type(value: Any) -> Callable[[], None]:
    """Set accelerate's process-wide `PartialState().distributed_type` to `value`; returns the function that puts
    back what was there (call it once, when the accelerator that needed the change is done)."""
    from accelerate import PartialState

    shared = PartialState._shared_state
    missing = object()
    before = shared.get("distributed_type", missing)
    shared["distributed_type"] = value

    def restore() -> None:
        if shared.get("distributed_type", missing) is not value:
            return  # accelerate reset or changed the state since: leave it
        if before is missing:
            shared.pop("distributed_type", None)
        else:
            shared["distributed_type"] = before

    return restore


@contextlib.contextmanager
def parallelism_check_deferred(checks: list) -> Iterator[None]:
    """Scope under which `Accelerator.__init__` records its `ParallelismConfig` check instead of running it (in
    `checks`, as callables): the caller runs them once it has set the accelerator up (restored on exit, also on
    error)."""
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig.__dict__["_validate_accelerator"]

    def record(self, accelerator):
        checks.append(lambda: original(self, accelerator))

    ParallelismConfig._validate_accelerator = record
    try:
        yield
    finally:
        ParallelismConfig._validate_accelerator = original
