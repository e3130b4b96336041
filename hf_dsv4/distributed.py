"""The few torch.distributed facts and one failure rule that every hf_dsv4 layer shares.

- `is_distributed()`, `rank()`, `is_main()`: where this process stands (one process counts as rank 0 of 1).
- `local_device()`: this rank's compute device, its GPU (cuda:LOCAL_RANK) under a CUDA backend, else the CPU.
- `every_rank_raises()` and `on_source(fn)`: collectives under which a failure on one rank is raised on every rank,
  as the *same* exception (its type, message and cause chain), so no rank goes on to wait in a later collective. The
  rank that failed re-raises its own exception object; the others raise an unpickled copy with a note naming the rank.
  In one process both are plain Python: the exception propagates as it is.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_CHAIN_LIMIT = 16


def is_distributed() -> bool:
    """True inside an initialized torch.distributed group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this process is global rank 0 (always, outside torch.distributed)."""
    return rank() == 0


def drives_cuda(backend: str) -> bool:
    """Whether a process group backend string runs collectives on CUDA tensors: "nccl", or a per-device string with a
    cuda entry, as accelerate initialises with CPU offload or FULL_STATE_DICT ("cuda:nccl,cpu:gloo")."""
    backend = str(backend).lower()
    if ":" not in backend:
        return backend == "nccl"
    return any(part.split(":", 1)[0].strip() == "cuda" for part in backend.split(","))


def local_device() -> torch.device:
    """This rank's compute device: under a CUDA backend its GPU, cuda:LOCAL_RANK (the launcher's one GPU per rank on
    each machine) made the current device if it is not (NCCL's object collectives run on the current device: a script
    that only called `init_process_group("nccl")` would put every rank's on cuda:0); else the CPU."""
    if not (dist.is_available() and dist.is_initialized() and torch.cuda.is_available()):
        return torch.device("cpu")
    if not drives_cuda(dist.get_backend()):
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    index = torch.cuda.current_device()
    if local_rank is not None and int(local_rank) != index:
        if int(local_rank) >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {dist.get_rank()}: LOCAL_RANK={local_rank} but this machine shows {torch.cuda.device_count()} "
                "GPU(s): launch at most one process per GPU (CUDA_VISIBLE_DEVICES)"
            )
        index = int(local_rank)
        torch.cuda.set_device(index)
    return torch.device("cuda", index)


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective over `group`, default all ranks; `[obj]` in one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


# ------------------------------------------------------------------------------------------ failures on every rank


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError that names its type and message."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:  # noqa: BLE001 - some exceptions cannot be rebuilt from their args
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes (or implicit contexts), outermost first."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < _CHAIN_LIMIT and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return chain


def _payload(exc: BaseException | None) -> bytes | None:
    """What a failed rank sends: its exception chain (portable copies, notes and cause links dropped) and traceback."""
    if exc is None:
        return None
    chain = []
    for link in _chain(exc):
        portable = _portable(link)
        chain.append(portable if portable is not link else pickle.loads(pickle.dumps(link)))
    text = "".join(traceback.format_exception(exc))
    return pickle.dumps((chain, text))


def _rebuild(payload: bytes, failed_rank: int) -> BaseException:
    """The exception a failed rank sent, with its cause chain re-linked and a note saying where it was raised."""
    chain, text = pickle.loads(payload)
    for outer, inner in zip(chain, chain[1:]):
        outer.__cause__ = inner
    head = chain[0]
    head.add_note(
        f"raised on rank {failed_rank}, re-raised on rank {rank()} by hf_dsv4; rank {failed_rank}'s traceback:"
    )
    head.add_note(text.rstrip())
    return head


@contextlib.contextmanager
def every_rank_raises(group: Any = None) -> Iterator[None]:
    """Collective scope: if the block raises an `Exception` on any rank, every rank raises it on exit.

    Every rank must enter and leave the block (the exit is one `all_gather_object`, over `group` if given: a group
    of all ranks with its own timeout, for a block that may outlast the default one). The lowest failed rank's
    exception wins: that rank re-raises its own object, the others a copy of it. In one process this is a no-op."""
    if not is_distributed():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - agreed on below, then re-raised
        error = exc
    payloads = all_gather_object(_payload(error), group=group)
    failed = next((r for r, p in enumerate(payloads) if p is not None), None)
    if failed is None:
        return
    if failed == rank():
        raise error
    raise _rebuild(payloads[failed], failed)


def on_source(fn: Callable[[], T], src: int = 0) -> T | None:
    """Run `fn` on rank `src` only (None elsewhere); if it raises, every rank raises it (a collective: one
    `broadcast_object_list` from `src`). In one process: `fn()`."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if rank() == src:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - broadcast, then re-raised
            error = exc
    box = [_payload(error)]
    dist.broadcast_object_list(box, src=src)
    if box[0] is not None:
        if error is not None:
            raise error
        raise _rebuild(box[0], src)
    return result
