"""Filling the shards of a streamed model (`memory_efficient_init(stream=True)`) on rank 0: each unit read from the
checkpoint under the model's own names, also when the model was wrapped after `from_pretrained` (a PEFT adapter: its
base layers are named `...base_layer...`, its new tensors are not in the checkpoint and get rank 0's initial values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..distributed import local_device
from ..loading.stream import StreamedCheckpoint
from ..loading.units import in_unit, layer_units, non_persistent_buffers, pretrained_models
from .layout import ShardingError

_WRAPPED = "base_layer"  # peft's name for the layer it wraps


def _outer_prefix(model: nn.Module) -> str:
    """Where the transformers model sits in `model` ("" for itself, "base_model.model." under a PeftModel)."""
    pretrained = pretrained_models(model)[0]
    name = next(n for n, m in model.named_modules() if m is pretrained)
    return f"{name}." if name else ""


def checkpoint_name(model_key: str, outer: str) -> str:
    """A wrapped model's state-dict name as the unwrapped model (and so the checkpoint reader) knows it."""
    return ".".join(part for part in model_key[len(outer) :].split(".") if part != _WRAPPED)


def reader_names(model: nn.Module) -> Callable[[str], str]:
    """`checkpoint_name` for `model`: a name of `model` as the checkpoint reader knows it."""
    outer = _outer_prefix(model)
    return lambda name: checkpoint_name(name, outer)


def lora_layers(model: nn.Module):
    """(name inside the transformers model, LoRA layer, adapter name, init_lora_weights) for every LoRA factor pair
    of the PeftModel `model`."""
    from peft.tuners.lora.layer import LoraLayer

    outer, configs = _outer_prefix(model), getattr(model, "peft_config", {})
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.lora_A):
                init = configs[adapter].init_lora_weights if adapter in configs else True
                yield name[len(outer) :], module, adapter, init


def _peft_init(model: nn.Module) -> None:
    """peft's own initialisation of every LoRA pair on meta, allocated on CPU (`reset_lora_parameters`: A as peft
    draws it, B zero)."""
    for _, module, adapter, init in lora_layers(model):
        module.lora_A[adapter].to_empty(device="cpu")
        module.lora_B[adapter].to_empty(device="cpu")
        module.reset_lora_parameters(adapter, init)


@torch.no_grad()
def initial_adapter(model: nn.Module, init: Callable[[nn.Module], object] | None = None) -> dict[str, torch.Tensor]:
    """The initial values of the tensors a wrapper added after a streamed `from_pretrained` (on meta, as their base
    was): PEFT LoRA factors, allocated on CPU and drawn by `init(model)` (the caller's policy, e.g. the trainer's
    seeded draw), else by peft's own initialisation. {} for an unwrapped model.

    Raises:
        ShardingError: an adapter's `init_lora_weights` is neither True nor "gaussian", or a new tensor was left on
            meta.
    """
    if pretrained_models(model)[0] is model:
        return {}
    for name, _, _, how in lora_layers(model):
        if how not in (True, "gaussian"):
            raise ShardingError(
                f"'{name}': init_lora_weights={how!r} is not supported for a streamed model (its base weights are "
                "not there when the adapter is added): use True or 'gaussian', or load without stream=True"
            )
    (init or _peft_init)(model)
    state = model.state_dict(keep_vars=True)
    unknown = [key for key, tensor in state.items() if tensor.is_meta and ".lora_" in key]
    if unknown:
        raise ShardingError(f"no initial values for {len(unknown)} adapter tensor(s), e.g. '{unknown[0]}'")
    return {key: tensor.detach() for key, tensor in state.items() if ".lora_" in key}


@torch.no_grad()
def broadcast_initial_adapter(initial: dict[str, torch.Tensor]) -> None:
    """Make every rank's `initial` adapter values rank 0's, when each rank reads its own rows (`readers="all"`) and
    drew them with peft's own initialisation, which differs from rank to rank. A collective."""
    import torch.distributed as dist

    device = local_device()  # the factors are drawn on CPU; NCCL broadcasts only CUDA tensors (GPU-only path)
    for key in sorted(initial):
        tensor = initial[key]
        sent = tensor.to(device)
        dist.broadcast(sent, src=0)
        if sent is not tensor:
            tensor.copy_(sent)


def streamed_buffers(model: nn.Module, stream: StreamedCheckpoint) -> dict[str, torch.Tensor]:
    """The model's non-persistent buffers (rotary `*_inv_freq`) as stock `from_pretrained` computed them."""
    outer, computed = _outer_prefix(model), stream.non_persistent_buffers()
    return {name: computed[checkpoint_name(name, outer)] for name in non_persistent_buffers(model)}


def stream_reader(
    model: nn.Module, stream: StreamedCheckpoint, initial: dict[str, torch.Tensor]
) -> Callable[..., dict[str, torch.Tensor]]:
    """The streamed checkpoint's `UnitReader` (`hf_dsv4.sharding.fill`): `read(prefix, rows=None, only=None)`, the unit of
    `model` at `prefix` (a decoder layer, or "" for the rest), keyed as the unit's own state dict: its checkpoint
    tensors, read and converted by `stream`, and the `initial` values of what the checkpoint does not hold; with
    `rows` ({key: (start, stop)}) only those rows of those tensors, with `only` (keys) only those tensors. Every
    checkpoint tensor of the unit must find its place."""
    outer = _outer_prefix(model)
    # each unit's state-dict keys, taken now (sharding keeps the names): reads run in a background thread while the
    # shards are filled, so they never look at the model itself
    units = {prefix: list(module.state_dict(keep_vars=True)) for prefix, module in layer_units(model)}
    readable = stream.readable()
    unfilled = [k for k in units[""] if k not in initial and checkpoint_name(k, outer) not in readable]
    if unfilled:  # e.g. peft's modules_to_save copies: they would be left uninitialised
        raise ShardingError(
            f"{len(unfilled)} tensor(s) of the model are neither in the checkpoint nor a new adapter's (e.g. "
            f"'{unfilled[0]}'); a streamed model takes LoRA adapters without modules_to_save: load without stream=True"
        )

    def read(
        prefix: str, rows: dict[str, tuple[int, int]] | None = None, only: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        rows = rows or {}
        unit_prefix = prefix[len(outer) :] if prefix else ""
        wanted = {checkpoint_name(prefix + key, outer): span for key, span in rows.items()}
        names = None if only is None else {checkpoint_name(prefix + key, outer) for key in only}
        unit = stream.read(unit_prefix, wanted, names)
        part, unfilled = {}, []
        for key in units[prefix]:
            full = prefix + key
            if not in_unit(full, prefix, units):
                continue  # the rest: decoder layers are units of their own
            if only is not None and key not in only:
                continue
            if full in initial:  # read once per unit, or once per piece of it (then dropped with the reader)
                value = initial[full] if only is not None else initial.pop(full)
                if key in rows:
                    start, stop = rows[key]
                    value = value[start:stop].clone()
                part[key] = value
                continue
            name = checkpoint_name(full, outer)[len(unit_prefix) :]
            if name in unit:
                part[key] = unit.pop(name)
            else:
                unfilled.append(full)
        if unit or unfilled:  # checked for the whole model before the stream started: a bug if reached
            raise ShardingError(f"'{prefix or 'the rest'}': unplaced {sorted(unit)[:4]}, unfilled {unfilled[:4]}")
        return part

    return read
