"""`shard_model`: FSDP2 for DeepSeek-V4 with one copy of the weights, on rank 0, sent into every shard through DCP.

The steps, in order, each a short named function: agree on how a streamed checkpoint is read (`_agree`); give every
rank's model the same form (keep the FP8 / FP4 weights quantized, align the dtypes of routed-expert LoRA factors,
check every rank's model against rank 0's: `_same_form`); take the weights' source (`_weight_source`: rank 0's state
dict or a checkpoint reader, and the fill strategy); shard on meta (`_shard_on_meta`: `fully_shard` per decoder layer
and dtype, buffers allocated); fill the shards one layer at a time (`fill.fill_shards`); re-tie weights. The other
ranks may hold a meta model (see `hf_dsv4.loading.memory_efficient_init`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

from .. import compat
from ..distributed import all_gather_object, every_rank_raises, local_device
from ..loading.stream import StreamSource, release_stream, stream_source
from ..loading.units import layer_units, non_persistent_buffers
from .fill import (
    WeightSource,
    fill_shards,
    materialize_buffers,
    nothing_to_read,
    state_dict_reader,
    tie_weights,
    validate_against_source,
)
from .layout import ShardingError, apply_fsdp
from .quantized import QuantizedPlan, quantize_base
from .streamed import broadcast_initial_adapter, initial_adapter, reader_names, stream_reader, streamed_buffers

logger = logging.getLogger(__name__)


def align_parameter_adapter_dtypes(model) -> int:
    """Cast LoRA weights that peft applies through `target_parameters` (routed experts) to the dtype of the parameter
    they adapt.

    peft applies such an adapter by parametrizing the base parameter when the wrapper's forward starts, before any
    FSDP2 group rooted below it could be all-gathered, so under FSDP2 the base parameter and its LoRA factors must be
    all-gathered by an enclosing module's group (the decoder layer's), which holds a single dtype. With a bf16 base
    the routed-expert adapter therefore trains in bf16 (attention and shared-expert adapters stay fp32). Meta tensors
    are cast too, so every rank agrees.

    Args:
        model: the model, with or without a peft adapter (changed in place).

    Returns:
        How many adapter modules were cast (0 when peft is not imported).
    """
    if "peft" not in sys.modules:
        return 0  # no peft model can exist
    compat.require("peft")
    param_wrapper = compat.param_wrapper_class()
    cast = 0
    for module in model.modules():
        if not isinstance(module, param_wrapper):
            continue
        dtype = module.get_param().dtype
        for factors in (module.lora_A, module.lora_B):
            for adapter in factors.values():
                if any(p.dtype != dtype for p in adapter.parameters()):
                    adapter.to(dtype)
                    cast += 1
    return cast


class _Agreed(NamedTuple):
    """How a streamed checkpoint is read, as rank 0 has it (every rank takes rank 0's path)."""

    readers: str | None  # "rank0" or "all"; None: not streamed
    budget: int | None  # bytes per piece read
    quantized: tuple[QuantizedPlan, str] | None  # the weights kept quantized and how experts compute


def _agree(stream: StreamSource | None, read_budget: int | None) -> _Agreed:
    """Rank 0's way of reading (`_Agreed`), checked against every rank's: the ranks must have loaded alike."""
    mine = stream.readers if stream else None
    budget = stream.read_budget if read_budget is None and stream else read_budget
    plan = None
    with every_rank_raises():  # rank 0 alone plans: its failure must not leave the others in the gather below
        if stream and stream.keep_quantized and stream.checkpoint and dist.get_rank() == 0:
            plan = (stream.checkpoint.quantized_plan(), stream.quantized_experts)
    gathered = all_gather_object((mine, budget, plan))
    seen = [readers for readers, _, _ in gathered]
    if len(set(seen)) > 1:
        raise ShardingError(
            f"the ranks loaded the model differently (readers per rank: {seen}); enter the same "
            "memory_efficient_init(stream=..., readers=...) on every rank"
        )
    return _Agreed(*gathered[0])


def _same_form(model: nn.Module, agreed: _Agreed, streamed: bool) -> None:
    """Give every rank's model the form rank 0's has (quantized weights, adapter dtypes), then check it is rank 0's:
    both before validation, so every rank compares the same table."""
    if agreed.quantized:
        with every_rank_raises():
            count = quantize_base(model, agreed.quantized[0], reader_names(model), experts=agreed.quantized[1])
        logger.info("%d weight(s) kept quantized (FP8 / FP4 as stored), experts %s", count, agreed.quantized[1])
    cast = align_parameter_adapter_dtypes(model)
    if cast:
        logger.info("%d routed-expert LoRA factor(s) kept in the experts' dtype", cast)
    validate_against_source(model, streamed=streamed)


@torch.no_grad()
def _weight_source(
    model: nn.Module,
    stream: StreamSource | None,
    agreed: _Agreed,
    init_adapter: Callable[[nn.Module], object] | None,
    read_ahead: bool,
) -> WeightSource:
    """Where the shards' weights come from: rank 0's own tensors (references: moving the model to meta copies
    nothing), or a streamed checkpoint's reader with the new adapter's initial values (rank 0's checks fail on every
    rank); and the fill strategy."""
    if stream is None:
        if dist.get_rank() != 0:
            return WeightSource(nothing_to_read)
        buffers = dict(non_persistent_buffers(model))
        prefixes = [prefix for prefix, _ in layer_units(model)]
        return WeightSource(state_dict_reader(dict(model.state_dict()), prefixes), buffers=buffers)
    strategy = "own_rows" if agreed.readers == "all" else "from_rank0" if agreed.budget is None else "in_pieces"
    source = WeightSource(nothing_to_read, strategy, budget=agreed.budget, read_ahead=read_ahead)
    with every_rank_raises():
        if stream.checkpoint is not None:
            source.buffers = streamed_buffers(model, stream.checkpoint)
            initial = initial_adapter(model, init_adapter)
            if strategy == "own_rows" and init_adapter is None:  # peft's own draw differs from rank to rank
                broadcast_initial_adapter(initial)
            source.read = stream_reader(model, stream.checkpoint, initial)
    return source


def _shard_on_meta(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool,
    mixed_precision: MixedPrecisionPolicy | None,
    cpu_offload: bool,
    device: torch.device,
) -> None:
    """Every rank shards a meta model the same way (rank 0's real tensors live on in its `WeightSource` only);
    the buffers are allocated on `device`: FSDP2 offloads parameters only, and collectives run there too."""
    model.to("meta")
    tie_weights(model)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None
    apply_fsdp(model, mesh, reshard_after_forward, mixed_precision, offload)
    materialize_buffers(model, device)


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    mixed_precision: MixedPrecisionPolicy | None = None,
    cpu_offload: bool = False,
    read_ahead: bool = True,
    read_budget: int | None = None,
    stream: StreamSource | None = None,
    init_adapter: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Shard `model` with FSDP2 and fill every shard with rank 0's weights, in place; returns `model`.

    Every rank must call it. Rank 0 must hold real weights; the other ranks may hold the same model on meta
    (`memory_efficient_init`) or real weights (ignored). A model loaded under `memory_efficient_init(stream=True)` is
    on meta on every rank: rank 0 reads it from the checkpoint one unit at a time, the next unit while the previous
    one is sent unless `read_ahead=False` (then rank 0 holds one unit instead of two). With `read_budget` (bytes;
    default: the one given to `memory_efficient_init`; rank 0's counts) rank 0 reads each rank's rows in pieces of at
    most that many converted bytes and sends each piece to its rank, so it never holds a unit (a tensor larger than
    the budget, such as Flash's 8.6 GB fused experts, is read in row slices). Under
    `memory_efficient_init(stream=True, readers="all")` every rank reads its own rows (in pieces within the budget, if
    one is given) and nothing is sent.

    `mesh` defaults to a 1-D mesh over all ranks on this rank's device (GPU under NCCL, else CPU); `mixed_precision`
    applies to bf16/fp32 groups only, never to fp32-kept modules or FP8/integer tensors; `cpu_offload` keeps sharded
    parameters on the CPU (also on CPU-only machines). LoRA factors that peft applies through `target_parameters`
    (routed experts) are cast to the dtype of the weight they adapt first (`align_parameter_adapter_dtypes`). Raises
    `ShardingError` on every rank if any rank's model differs from rank 0's.

    Args:
        model: the model (a transformers model or a PeftModel of one), on every rank.
        mesh: the device mesh (1-D: FSDP; 2-D: HSDP); default all ranks on this rank's device.
        reshard_after_forward: FSDP2's `reshard_after_forward` for the decoder layers.
        mixed_precision: FSDP2's `MixedPrecisionPolicy` for bf16/fp32 groups.
        cpu_offload: keep the sharded parameters on the CPU (buffers stay on the compute device).
        read_ahead: streamed from rank 0: read the next unit while one is sent.
        read_budget: bytes per piece read (see above); default the one given to `memory_efficient_init`.
        stream: how to fill a model built on meta under `memory_efficient_init(stream=True)`; default the
            `StreamSource` its `from_pretrained` registered (`hf_dsv4.loading.stream.stream_source(model)`), None for
            a model loaded otherwise. Released (its reader closed) once the shards are filled.
        init_adapter: for a streamed model wrapped after loading (a PEFT LoRA adapter, its factors on meta): called
            with the model on each reading rank to allocate (on CPU) and draw the adapter's factors, the same values
            on every rank (e.g. `hf_dsv4.training.lora.seeded_lora_init(seed)`, what `DSV4SFTTrainer` passes).
            Default: peft's own initialisation on rank 0, sent to the other ranks when every rank reads.

    Returns:
        `model`, sharded in place.

    Raises:
        ShardingError: not under torch.distributed, or the ranks' models or load settings differ (on every rank).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ShardingError("shard_model needs torch.distributed; start with torchrun or `accelerate launch`")
    device = local_device()
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    stream = stream_source(model) if stream is None else stream  # None unless loaded streamed
    agreed = _agree(stream, read_budget)
    _same_form(model, agreed, streamed=stream is not None)
    source = _weight_source(model, stream, agreed, init_adapter, read_ahead)
    _shard_on_meta(model, mesh, reshard_after_forward, mixed_precision, cpu_offload, device)
    fill_shards(model, source, device, shards_on="cpu" if cpu_offload else device)
    del source
    tie_weights(model)
    if stream is not None:
        release_stream(model, stream)
    logger.info("rank %d: model sharded over %d ranks", dist.get_rank(), dist.get_world_size())
    return model
