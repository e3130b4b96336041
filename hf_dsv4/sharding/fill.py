"""Filling the shards: every rank checks its model against rank 0's, then the shards are filled from a
`WeightSource` by one of three strategies (`fill_shards`), all reading units through one interface (`UnitReader`):

- `load_from_source`: rank 0 reads each unit whole (its own state dict, or a streamed checkpoint) and DCP sends it
  into every shard (`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`), one decoder layer at a
  time;
- `load_in_pieces`: rank 0 reads each rank's rows of a streamed unit in pieces within a byte budget and sends each
  piece to its rank;
- `load_own_rows`: every rank reads its own rows of a streamed checkpoint (`readers="all"`); no weight is sent.

Then the buffers outside the state dict are made equal to rank 0's (`broadcast_non_persistent_buffers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard
from tqdm.auto import tqdm

from ..distributed import all_gather_object, every_rank_raises, on_source
from ..loading.units import (
    in_unit,
    layer_units,
    non_persistent_buffers,
    pretrained_models,
    tensor_table,
    unit_entries,
)
from .layout import ShardingError

# A unit's reader: `read(prefix, rows=None, only=None)` returns the tensors of the model's unit at `prefix` (a decoder
# layer, or "" for the rest) keyed as the unit's own state dict; with `rows` ({key: (start, stop)}) only those rows
# of those tensors, with `only` (keys) only those tensors. Who calls it is the strategy's choice (rank 0, or every
# rank); a failure is raised on every rank.
UnitReader = Callable[..., dict[str, torch.Tensor]]


@dataclass
class WeightSource:
    """Where the shards' weights come from, and how they reach the shards (what `shard_model` hands `fill_shards`).

    Args:
        read: the unit reader (`UnitReader`): rank 0's state dict (`state_dict_reader`) or a streamed checkpoint's
            (`hf_dsv4.sharding.streamed.stream_reader`); a reader that returns nothing on the ranks that never read.
        strategy: "from_rank0" (`load_from_source`), "in_pieces" (`load_in_pieces`) or "own_rows" (`load_own_rows`).
        buffers: the non-persistent buffers (rank 0's; every rank's own under "own_rows").
        budget: bytes per piece read ("in_pieces"; optional under "own_rows").
        read_ahead: "from_rank0" over a streamed checkpoint: read the next unit while one is sent.
    """

    read: UnitReader
    strategy: Literal["from_rank0", "in_pieces", "own_rows"] = "from_rank0"
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    budget: int | None = None
    read_ahead: bool = False


def state_dict_reader(state_dict: dict[str, torch.Tensor], prefixes: list[str]) -> UnitReader:
    """A `UnitReader` over a full state dict (rank 0's weights before sharding). A whole unit is handed over once:
    its entries leave `state_dict`, so rank 0's memory falls as the shards fill; a read of some rows or some tensors
    (`rows` / `only`) takes views and leaves the entries there.

    Args:
        state_dict: model tensor name -> tensor (emptied by whole-unit reads).
        prefixes: every unit's prefix, as `layer_units` gives them (the rest, "", holds what no decoder layer holds).

    Returns:
        `read(prefix, rows=None, only=None)`.
    """

    def read(
        prefix: str, rows: dict[str, tuple[int, int]] | None = None, only: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        keys = [k for k in state_dict if in_unit(k, prefix, prefixes) and (only is None or k[len(prefix) :] in only)]
        if rows is None and only is None:
            return {key[len(prefix) :]: state_dict.pop(key) for key in keys}
        part = {key[len(prefix) :]: state_dict[key] for key in keys}
        return {key: t[slice(*rows[key])] if rows and key in rows else t for key, t in part.items()}

    return read


def nothing_to_read(prefix: str, rows=None, only=None) -> dict[str, torch.Tensor]:
    """The `UnitReader` of a rank that holds no weights and reads none (the strategy never calls it there)."""
    return {}


def fill_shards(
    model: nn.Module, source: WeightSource, device: torch.device | str, shards_on: torch.device | str
) -> None:
    """Fill the shards of `model` (sharded on meta, buffers on `device`) from `source` by its strategy, then make
    the non-persistent buffers rank 0's. Every rank must call it.

    Args:
        model: the sharded model.
        source: the weights and the strategy (`WeightSource`).
        device: the compute device (collectives run there; the buffers stay there).
        shards_on: where the shards go (`device`, or "cpu" under CPU offload).

    Raises:
        ShardingError: a unit read does not fit the model (on every rank).
    """
    if source.strategy == "own_rows":
        load_own_rows(model, source.read, shards_on, source.budget, buffers_on=device)
    elif source.strategy == "in_pieces":
        load_in_pieces(model, source.read, shards_on, source.budget, comm_device=device, buffers_on=device)
    else:  # DCP broadcasts on the compute device; FSDP2's post-load hook moves offloaded shards to the CPU
        load_from_source(model, source.read, device, read_ahead=source.read_ahead)
    broadcast_non_persistent_buffers(model, source.buffers, local=source.strategy == "own_rows")


# ------------------------------------------------------------------------------------------------- validation


def _compare_tables(rank: int, source: dict, local: dict) -> list[str]:
    """Human-readable differences between rank 0's table and this rank's."""
    problems = []
    for name, (shape, dtype, kind) in source.items():
        if name not in local:
            problems.append(f"rank {rank}: {kind} '{name}' {shape} {dtype} is missing (rank 0 has it)")
        elif local[name] != (shape, dtype, kind):
            problems.append(f"rank {rank}: '{name}' is {local[name]} but {(shape, dtype, kind)} on rank 0")
    problems += [f"rank {rank}: unexpected {local[n][2]} '{n}' (not on rank 0)" for n in local if n not in source]
    return problems


def _meta_on_source(model: nn.Module) -> list[str]:
    """Rank 0 must hold real weights: the names of its meta tensors, as problems."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [f"rank 0: '{n}' is on the meta device; load rank 0's weights first" for n, t in named if t.is_meta]


def validate_against_source(model: nn.Module, streamed: bool = False) -> None:
    """Collective: rank 0 sends its name -> (shape, dtype) table; any difference on any rank raises everywhere.
    Rank 0 must hold real weights unless they are `streamed` from its checkpoint."""
    rank = dist.get_rank()
    local = tensor_table(model)
    source = [local if rank == 0 else None]
    dist.broadcast_object_list(source, src=0)
    if rank != 0:
        problems = _compare_tables(rank, source[0], local)
    else:
        problems = [] if streamed else _meta_on_source(model)
    problems = [p for rank_problems in all_gather_object(problems) for p in rank_problems]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ShardingError(
            f"the model differs from rank 0's on {len(problems)} tensor(s); build every rank from the same "
            f"checkpoint and config (hf_dsv4.memory_efficient_init does):\n  {shown}"
        )


# ------------------------------------------------------------------------------------------------- weights


def tie_weights(model: nn.Module) -> None:
    """`tie_weights()` on every transformers model in the tree (no-op when the config does not tie)."""
    for pretrained in pretrained_models(model):
        pretrained.tie_weights()


def materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Allocate every buffer on `device` (values follow); parameters stay on meta."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:  # assigning a registered buffer's name replaces it, persistence unchanged
                setattr(module, name, torch.empty_like(buffer, device=device))


def _on_meta(module: nn.Module) -> bool:
    """Whether no tensor of `module`'s state dict is allocated yet (0-dim ones aside)."""
    return all(t.is_meta for t in module.state_dict(keep_vars=True).values() if t.dim() > 0)


def load_from_source(model: nn.Module, read: UnitReader, device: torch.device | str, read_ahead: bool = False) -> None:
    """Send rank 0's units into every rank's shards with DCP (`broadcast_from_rank0`), one decoder layer at a time:
    rank 0 reads each unit whole (`read(prefix)`, only there: its own state dict's entries, `state_dict_reader`, or a
    streamed checkpoint's), sends it and drops it, so its memory falls as the shards fill instead of holding the
    checkpoint and the shards at once. With `read_ahead` the next unit is read while one is sent (`_ReadAhead`), so
    rank 0 holds at most two units (one without). A failure to read is raised on every rank.

    Parameters are expected on meta and buffers on `device` (`materialize_buffers`): DCP then assigns each received
    shard instead of copying it into an allocated parameter (and, for the root, every loaded parameter into itself),
    and puts the shards on the device of the tensors it finds allocated. `device` is the compute device, the one DCP
    broadcasts on, also under CPU offload: FSDP2 moves each assigned shard to the (pinned) CPU itself (its
    `load_state_dict` post-hook), while the buffers stay where compute needs them."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    is_source = dist.get_rank() == 0
    units = layer_units(model)
    prefixes = [p for p, _ in units]
    ahead = _ReadAhead(read, prefixes) if is_source and read_ahead else None
    fetch = ahead or read  # rank 0's reads; never called elsewhere (`on_source`)
    if is_source:
        units = tqdm(units, desc="sending the weights into the shards", unit="layer", disable=None)
    try:
        for prefix, module in units:
            if _on_meta(module):  # no buffer to take the device from: DCP would use the process group's default device
                module.to_empty(device=device)
            part = on_source(lambda prefix=prefix: fetch(prefix)) or {}
            parts = _quantized_parts(prefix, module, prefixes)
            with every_rank_raises():  # DCP's broadcast is a collective: check rank 0's part before it
                if is_source:
                    _check_part(prefix, module, part, parts)
            _send_quantized(module, part, parts, device)
            set_model_state_dict(module, part, options=options)
            del part
    finally:
        if ahead is not None:
            ahead.close()


def _quantized_parts(prefix: str, module: nn.Module, prefixes: list[str]) -> dict[str, torch.Tensor]:
    """The unit's state-dict entries that are parts of its quantized weights (`<leaf>_q`, `<leaf>_scale`:
    `hf_dsv4.sharding.quantized`), not parameters or buffers of their own."""
    own = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {key: t for key, t in unit_entries(prefix, module, prefixes).items() if key not in own}


def _send_quantized(
    module: nn.Module, part: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], device: torch.device | str
) -> None:
    """Rank 0's quantized weights' parts (`parts`: their entries, popped from its `part`) broadcast, every rank's rows
    kept and assigned: DCP's broadcast fills the parameters it finds by name, and a quantized weight's parameter is
    filled from its two parts (a collective)."""
    local = {}
    for key in sorted(parts):
        entry = parts[key]
        with every_rank_raises():  # rank 0's copy to the device comes before the broadcast (a collective)
            whole = part.pop(key).to(device) if dist.get_rank() == 0 else None
        if whole is None:
            whole = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        dist.broadcast(whole, src=0)
        rows = own_rows(entry)
        local[key] = whole if rows is None else whole[rows[0] : rows[1]].clone()
    if local:
        with every_rank_raises():  # DCP's fill of the unit's other tensors follows (collectives)
            _assign(module, parts, local)


def _check_part(
    prefix: str, module: nn.Module, part: dict[str, torch.Tensor], parts: dict[str, torch.Tensor] | None = None
) -> None:
    """Rank 0's part of a unit must fit the unit: every key one of its state-dict entries, with its (full) shape and
    dtype, and every quantized weight's `parts` there. Raises ShardingError naming the first misfits."""
    entries = module.state_dict(keep_vars=True)
    problems = [f"'{prefix}{key}' is not in the model" for key in part if key not in entries]
    problems += [f"'{prefix}{key}' is missing (a quantized weight's part)" for key in parts or () if key not in part]
    problems += [
        f"'{prefix}{key}' is {tuple(t.shape)} {t.dtype}, the model's {tuple(entries[key].shape)} {entries[key].dtype}"
        for key, t in part.items()
        if key in entries and (t.shape != entries[key].shape or t.dtype != entries[key].dtype)
    ]
    if problems:
        raise ShardingError(f"rank 0 cannot send {len(problems)} tensor(s): " + "; ".join(problems[:5]))


def own_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows (dim 0) of `param`'s full tensor that this rank's shard holds, or None for a tensor every rank holds
    whole. FSDP2 shards dim 0 in `torch.chunk` pieces (ceil(n / k) rows each, the last ones shorter or empty) over each
    `Shard(0)` mesh dimension; `Replicate` dimensions (HSDP) hold the same rows."""
    if not isinstance(param, DTensor):
        return None
    start, stop = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard or placement.dim != 0:
            raise ShardingError(f"cannot read rows for placement {placement} (FSDP2 shards dim 0)")
        size, index = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
        chunk = -(-(stop - start) // size)
        start, stop = min(start + index * chunk, stop), min(start + (index + 1) * chunk, stop)
    if stop - start != param.to_local().shape[0]:
        raise ShardingError(f"rows [{start}, {stop}) do not match the local shard {tuple(param.to_local().shape)}")
    return start, stop


def load_own_rows(
    model: nn.Module,
    read: Callable[..., dict[str, torch.Tensor]],
    device: torch.device | str,
    budget: int | None = None,
    buffers_on: torch.device | str | None = None,
) -> None:
    """Fill every rank's shards from its own reads of the checkpoint, one unit at a time: `read(prefix, rows, only)`
    returns the unit's tensors (keyed as the unit's state dict) cut to `rows` ({key: (start, stop)}, this rank's rows
    of each sharded parameter; whole for the rest), all of them or `only` those. With a `budget` (bytes) each rank
    reads its rows in pieces of at most that many converted bytes (`read_pieces`). No weight crosses ranks; a failed
    read is raised on every rank. The shards are assigned as DTensors with the parameters' own mesh and placements
    (`load_state_dict(assign=True)`, as DCP does), on `device`; buffers on `buffers_on` (default `device`;
    `placement`)."""
    units = layer_units(model)
    prefixes = [p for p, _ in units]
    for prefix, module in tqdm(units, desc="reading this rank's rows into the shards", unit="layer", disable=None):
        own = unit_entries(prefix, module, prefixes)
        spans, devices = _spans(own), placement(own, device, buffers_on)
        local = {}
        with every_rank_raises():
            if budget is None:
                rows = {key: span for key, span in spans.items() if isinstance(own[key], DTensor)}
                local = {key: tensor.to(devices[key]) for key, tensor in read(prefix, rows).items()}
            else:
                local = _allocate(own, spans, devices)
                for piece in read_pieces(spans, _row_bytes(own), budget):
                    part = read(prefix, _cut_rows(own, piece), set(piece))
                    for key in piece:
                        _into(local[key], own[key], piece[key], spans[key]).copy_(part.pop(key))
                    del part
            _assign(module, own, local)


def _assign(module: nn.Module, own: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
    """Assign this rank's `local` tensors (its rows of each sharded parameter, whole for the rest) to the unit
    `module` whose state-dict entries are `own`: DTensors with the parameters' own mesh and placements, as DCP does
    (`load_state_dict(assign=True)`: FSDP2 takes them as its sharded parameters)."""
    state = {}
    for key, tensor in own.items():
        value = local.pop(key)
        if isinstance(tensor, DTensor):
            value = DTensor.from_local(
                value, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape,
                stride=tensor.stride(),
            )  # fmt: skip
        state[key] = value
    module.load_state_dict(state, strict=False, assign=True)


def _spans(own: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """The rows of each entry this rank holds: its shard's rows, all rows of what every rank holds whole (a 0-dim
    tensor counts as one row)."""
    return {key: own_rows(t) or (0, t.shape[0] if t.dim() else 1) for key, t in own.items()}


def _row_bytes(own: dict[str, torch.Tensor]) -> dict[str, int]:
    return {key: t.element_size() * math.prod(t.shape[1:]) for key, t in own.items()}


def placement(
    own: dict[str, torch.Tensor], device: torch.device | str, buffers_on: torch.device | str | None = None
) -> dict[str, torch.device | str]:
    """Where each state-dict entry of a unit goes: a parameter's shard on `device` (the CPU under CPU offload), a
    buffer on `buffers_on` (the compute device; default `device`): FSDP2 offloads parameters only, so a buffer left on
    the CPU would meet the GPU's activations (rotary `inv_freq`, hash routing's `tid2eid`)."""
    buffers_on = device if buffers_on is None else buffers_on
    return {key: device if isinstance(t, nn.Parameter) else buffers_on for key, t in own.items()}


def _allocate(own: dict[str, torch.Tensor], spans: dict, devices: dict) -> dict[str, torch.Tensor]:
    """Empty tensors for this rank's rows of each entry (on `devices[key]`), filled piece by piece."""
    return {
        key: torch.empty((stop - start, *t.shape[1:]) if t.dim() else (), dtype=t.dtype, device=devices[key])
        for key, t in own.items()
        for start, stop in [spans[key]]
    }


def _cut_rows(own: dict[str, torch.Tensor], piece: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """A piece's rows as `read` takes them (a 0-dim tensor is read whole)."""
    return {key: span for key, span in piece.items() if own[key].dim()}


def _into(local: torch.Tensor, entry: torch.Tensor, rows: tuple[int, int], span: tuple[int, int]) -> torch.Tensor:
    """The part of `local` (a rank's rows `span` of `entry`) where the piece's `rows` go."""
    return local[rows[0] - span[0] : rows[1] - span[0]] if entry.dim() else local


def read_pieces(
    spans: dict[str, tuple[int, int]], row_bytes: dict[str, int], budget: int
) -> list[dict[str, tuple[int, int]]]:
    """One rank's reads of a unit cut into pieces of at most `budget` bytes once converted: `spans` are the rows
    (start, stop) it needs of each tensor, `row_bytes` the bytes of one row. Tensors are taken in name order, a
    tensor larger than what is left of a piece is cut along its rows (dim 0; at least one row per piece). Tensors
    with no rows here are left out."""
    pieces, piece, used = [], {}, 0
    for key in sorted(spans):
        start, stop = spans[key]
        while start < stop:
            fits = (budget - used) // max(row_bytes[key], 1)
            if piece and fits < 1:
                pieces.append(piece)
                piece, used = {}, 0
                continue
            take = min(stop - start, max(fits, 1))
            piece[key] = (start, start + take)
            used += take * row_bytes[key]
            start += take
    return [*pieces, piece] if piece else pieces


def load_in_pieces(
    model: nn.Module,
    read: Callable[..., dict[str, torch.Tensor]],
    device: torch.device | str,
    budget: int,
    comm_device: torch.device | str | None = None,
    buffers_on: torch.device | str | None = None,
) -> None:
    """Fill every rank's shards from rank 0's reads of the checkpoint within a byte budget: for each unit and each
    rank, rank 0 reads that rank's rows (its shards' rows; whole tensors for what every rank holds whole) in pieces
    of at most `budget` converted bytes (`read_pieces`, a tensor cut along dim 0 if it is larger) and sends each
    piece to its rank (point to point; its own pieces it keeps). Rank 0 so holds one piece at a time (plus what
    converting it takes: FP8 rows widened to whole scale blocks, fp32 temporaries), never a unit; every rank
    receives exactly its rows. A failed read is raised on every rank. Messages travel on `comm_device` (the
    process group's device: the GPU under NCCL), the shards are placed on `device`, buffers on `buffers_on` (default
    `device`; `placement`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    comm_device = comm_device or device
    units = layer_units(model)
    prefixes = [p for p, _ in units]
    if rank == 0:
        units = tqdm(units, desc="streaming the checkpoint into the shards", unit="layer", disable=None)
    for prefix, module in units:
        own = unit_entries(prefix, module, prefixes)
        every_rank = all_gather_object(_spans(own))
        local = _allocate(own, every_rank[rank], dict.fromkeys(own, comm_device))
        for target in range(world):
            for piece in read_pieces(every_rank[target], _row_bytes(own), budget):
                rows, only = _cut_rows(own, piece), set(piece)
                part = on_source(lambda prefix=prefix, rows=rows, only=only: read(prefix, rows, only)) or {}
                if rank not in (0, target):
                    continue
                for key in sorted(piece):
                    if rank == 0 and target != 0:
                        dist.send(part.pop(key).to(comm_device).contiguous(), dst=target)
                        continue
                    view = _into(local[key], own[key], piece[key], every_rank[target][key])
                    if rank == 0:
                        view.copy_(part.pop(key))
                    else:
                        dist.recv(view, src=0)
                del part
        devices = placement(own, device, buffers_on)
        with every_rank_raises():
            _assign(module, own, {key: t.to(devices[key]) for key, t in local.items()})
        del local


class _ReadAhead:
    """Rank 0's streamed reads, one unit ahead: unit k+1 is read (and converted) in a background thread while unit k
    is sent, so reading overlaps the network; at most two units are held."""

    def __init__(self, read: Callable[[str], dict[str, torch.Tensor]], prefixes: list[str]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_dsv4-stream")
        self._read, self._prefixes, self._pending = read, list(prefixes), {}
        self._submit_next()

    def _submit_next(self) -> None:
        if self._prefixes:
            prefix = self._prefixes.pop(0)
            self._pending[prefix] = self._pool.submit(self._read, prefix)

    def __call__(self, prefix: str) -> dict[str, torch.Tensor]:
        future = self._pending.pop(prefix)
        part = future.result()
        self._submit_next()  # read the next unit while this one is sent
        return part

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def broadcast_non_persistent_buffers(model: nn.Module, source: dict[str, torch.Tensor], local: bool = False) -> None:
    """Make the buffers outside the state dict equal to rank 0's (they are recomputed from the config elsewhere);
    `local`: every rank's `source` holds them already, as stock `from_pretrained` computed them on that rank."""
    for name, buffer in non_persistent_buffers(model).items():
        if local or dist.get_rank() == 0:
            buffer.copy_(source[name])
        if not local:
            dist.broadcast(buffer, src=0)
