"""The units a DeepSeek-V4 model is loaded, sharded and saved by: its decoder layers, then the rest (embeddings,
final norm, head, ...). Shared by streamed loading, `shard_model`'s fill and the sharded export."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from .. import compat


def in_unit(name: str, prefix: str, prefixes: Iterable[str]) -> bool:
    """Whether the state-dict entry `name` (its full name) belongs to the unit `prefix`: it is under `prefix` and
    under no other unit's (`prefixes`: every unit's, as `layer_units` gives them; the rest, "", holds what no decoder
    layer holds)."""
    return name.startswith(prefix) and not any(p and p != prefix and name.startswith(p) for p in prefixes)


def unit_entries(prefix: str, module: nn.Module, prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """The unit `prefix`'s own state-dict entries (`keep_vars`), keyed as `module`'s state dict (the decoder layer's
    own names; for the rest, the model's names without the decoder layers')."""
    prefixes = list(prefixes)
    entries = module.state_dict(keep_vars=True).items()
    return {key: tensor for key, tensor in entries if in_unit(prefix + key, prefix, prefixes)}


def pretrained_models(model: nn.Module) -> list[PreTrainedModel]:
    """The transformers models in `model`'s tree (the model itself, or the one inside a PeftModel)."""
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose class is named in a `_no_split_modules` anywhere in the tree (the decoder layers); also after
    `fully_shard`, which swaps a module's class for an `FSDP<name>` subclass.

    Args:
        model: a transformers model, or a module holding one (e.g. a PeftModel).

    Returns:
        The decoder layers, in module order.
    """
    names = {name for m in pretrained_models(model) for name in compat.no_split_modules(m)}
    return [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]


def layer_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of each decoder layer, then ("", model) for what is left."""
    names = {id(m): name for name, m in model.named_modules()}
    return [(names[id(layer)] + ".", layer) for layer in decoder_layers(model)] + [("", model)]


def tensor_table(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, dtype, kind) for every parameter and buffer (kind: parameter / buffer / non-persistent)."""
    table = {}
    for name, param in model.named_parameters():
        table[name] = (tuple(param.shape), str(param.dtype), "parameter")
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        kind = "buffer" if name in persistent else "non-persistent buffer"
        table[name] = (tuple(buffer.shape), str(buffer.dtype), kind)
    return table


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of the buffers that `state_dict` leaves out (rotary `*_inv_freq`)."""
    persistent = set(model.state_dict(keep_vars=True))
    return {name: b for name, b in model.named_buffers() if name not in persistent}
