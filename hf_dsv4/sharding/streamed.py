"""Filling the shards of a streamed model (`memory_efficient_init(stream=True)`) on rank 0: each unit read from the
checkpoint under the model's own names, also when the model was wrapped after `from_pretrained` (a PEFT adapter: its
base layers are named `...base_layer...`, its new tensors are not in the checkpoint and get rank 0's initial values).
"""

from __future__ import annotations

import math
import zlib
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


ADAPTER_SEED = "_hf_dsv4_adapter_seed"  # set on a PeftModel whose LoRA factors are drawn by `draw_lora_factors`


def _lora_layers(model: nn.Module):
    """(name inside the transformers model, LoRA layer, adapter name, init_lora_weights) for every LoRA factor pair."""
    from peft.tuners.lora.layer import LoraLayer

    outer, configs = _outer_prefix(model), getattr(model, "peft_config", {})
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.lora_A):
                init = configs[adapter].init_lora_weights if adapter in configs else True
                yield name[len(outer) :], module, adapter, init


@torch.no_grad()
def draw_lora_factors(model: nn.Module, seed: int, allocate: bool = False) -> int:
    """Draw every LoRA factor pair of the PeftModel `model` as peft initialises it (`init_lora_weights` True: A
    kaiming-uniform with a = sqrt(5); "gaussian": A normal with std 1/r; B zero), each from its own generator seeded by
    `seed` and the layer's name: the same adapter whatever the number of ranks, the order of creation or whether the
    base was loaded streamed. Factors on meta are left alone unless `allocate` (allocated on CPU first). Adapters
    with another init are left as peft made them. Returns the number of pairs drawn."""
    drawn = 0
    for name, module, adapter, init in _lora_layers(model):
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if init not in (True, "gaussian") or (a.weight.is_meta and not allocate):
            continue
        if a.weight.is_meta:
            a.to_empty(device="cpu")
            b.to_empty(device="cpu")
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{adapter}".encode())) % 2**63)
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a.weight, std=1 / module.r[adapter], generator=generator)
        nn.init.zeros_(b.weight)
        if getattr(b, "bias", None) is not None:
            nn.init.zeros_(b.bias)
        drawn += 1
    return drawn


@torch.no_grad()
def initial_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's initial values of the tensors a wrapper added after a streamed `from_pretrained` (on meta, as their
    base was): PEFT LoRA factors, allocated on CPU and drawn by `draw_lora_factors` from the seed the model carries
    (`DSV4SFTTrainer` sets it: the same adapter as a run that does not stream), else by peft's own
    `reset_lora_parameters` (A as peft draws it, B zero). {} for an unwrapped model."""
    if pretrained_models(model)[0] is model:
        return {}
    for name, _, _, init in _lora_layers(model):
        if init not in (True, "gaussian"):
            raise ShardingError(
                f"'{name}': init_lora_weights={init!r} is not supported for a streamed model (its base weights are "
                "not there when the adapter is added): use True or 'gaussian', or load without stream=True"
            )
    seed = next((m.__dict__[ADAPTER_SEED] for m in model.modules() if ADAPTER_SEED in m.__dict__), None)
    if seed is not None:
        draw_lora_factors(model, seed, allocate=True)
    else:
        for _, module, adapter, init in _lora_layers(model):
            module.lora_A[adapter].to_empty(device="cpu")
            module.lora_B[adapter].to_empty(device="cpu")
            module.reset_lora_parameters(adapter, init)
    state = model.state_dict(keep_vars=True)
    unknown = [key for key, tensor in state.items() if tensor.is_meta and ".lora_" in key]
    if unknown:
        raise ShardingError(f"no initial values for {len(unknown)} adapter tensor(s), e.g. '{unknown[0]}'")
    return {key: tensor.detach() for key, tensor in state.items() if ".lora_" in key}


@torch.no_grad()
def broadcast_initial_adapter(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Make every rank's `initial` adapter values rank 0's, when each rank reads its own rows (`readers="all"`). An
    adapter drawn from the seed `DSV4SFTTrainer` sets is the same on every rank already; peft's own draw is not."""
    import torch.distributed as dist

    if any(ADAPTER_SEED in m.__dict__ for m in model.modules()):
        return
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
    """`read(prefix, rows=None, only=None)` for `load_from_source` / `load_own_rows` / `load_in_pieces`: the unit of
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
