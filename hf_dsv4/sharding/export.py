"""A sharded model written as a Hub checkpoint, with no rank ever holding it whole.

`save_pretrained_sharded(model, folder)` writes what `PreTrainedModel.save_pretrained` writes (config, generation
config, safetensors files with the checkpoint's own names and `model.safetensors.index.json`) from an FSDP2-sharded
transformers model: one file for the tensors outside the decoder layers (embeddings, final norm, head, ...) and one per
decoder layer, file k written by rank k % world_size. For each file every rank takes part in gathering its tensors
(one all-gather per sharded tensor) and only the writing rank keeps them, so a rank holds at most one file's full
tensors at a time. Names are turned back into the checkpoint's by transformers' own reverse weight conversion (for
DeepSeek-V4: the fused 3-D experts split into `experts.N.w1/w2/w3` again), one decoder layer at a time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .. import compat
from ..distributed import all_gather_object, every_rank_raises, is_distributed, on_source, rank
from ..loading.units import layer_units, pretrained_models

logger = logging.getLogger(__name__)

SHARD_FILE = "model-{index:05d}-of-{total:05d}.safetensors"


def _single_pretrained(model: nn.Module) -> PreTrainedModel:
    """The one transformers model to export: `model` itself (full fine-tuning), never one under an adapter."""
    peft = sys.modules.get("peft")  # no PeftModel can exist unless peft is imported
    if peft is not None and any(isinstance(m, peft.PeftModel) for m in model.modules()):
        raise ValueError(
            "save_pretrained_sharded writes a full model; this one holds a PEFT adapter: save the adapter "
            "(hf_dsv4.save_adapter), or merge it into the base first"
        )
    found = pretrained_models(model)
    if not found:
        raise TypeError(f"{type(model).__name__} holds no transformers PreTrainedModel to export")
    return found[0]


def _unsharded_class_name(model: nn.Module) -> str:
    """The model's class name as transformers knows it (FSDP2 swaps the class for an `FSDP<name>` subclass)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def _file_groups(model: PreTrainedModel) -> list[list[str]]:
    """The state-dict keys to export, grouped one file per decoder layer after one for the rest. A tied weight is
    written once, under its first name (what transformers expects to load it from); `_keys_to_ignore_on_save` is
    honoured."""
    first_names = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    keys = [key for key in model.state_dict(keep_vars=True) if key not in aliases and key not in ignored]
    units = layer_units(model)
    groups: dict[str, list[str]] = {prefix: [] for prefix, _ in units}
    for key in keys:
        prefix = next(p for p, _ in units if key.startswith(p))  # the last unit's prefix is "": the rest
        groups[prefix].append(key)
    ordered = [groups[""], *(groups[prefix] for prefix, _ in units if prefix)]
    return [group for group in ordered if group]


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective for a DTensor: every rank gets it); plain tensors as they are."""
    if not isinstance(tensor, DTensor):
        return tensor.detach()
    if tensor.device.type != tensor.device_mesh.device_type:  # CPU-offloaded shards travel on the mesh's device
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.full_tensor().detach()


def _clear_previous_export(folder: Path) -> None:
    for path in folder.glob("model*.safetensors"):
        path.unlink()
    (folder / SAFE_WEIGHTS_INDEX_NAME).unlink(missing_ok=True)


def save_pretrained_sharded(model: nn.Module, save_directory: str | os.PathLike) -> Path | None:
    """Write the FSDP2-sharded transformers model `model` as a Hub-loadable checkpoint (see the module docstring).

    `AutoModelForCausalLM.from_pretrained(save_directory)` reloads it. Every rank must call it. Earlier
    `model*.safetensors` files and the index in the folder are removed first; the index is written last, so an
    interrupted export is never taken for a complete one. In one process it writes the same files from the unsharded
    model.

    Args:
        model: the (sharded) transformers model, or a module holding one; never one under a PEFT adapter.
        save_directory: the folder to write (created if missing).

    Returns:
        The folder on rank 0, None on the other ranks.

    Raises:
        ValueError: `model` holds a PEFT adapter (save the adapter, or merge it first).
        TypeError: `model` holds no transformers `PreTrainedModel`.
        Exception: a failure on any rank while writing is raised on every rank.
    """
    pretrained = _single_pretrained(model)
    folder = Path(save_directory)
    on_source(lambda: (folder.mkdir(parents=True, exist_ok=True), _clear_previous_export(folder)))
    _use_source_conversions(pretrained)
    groups = _file_groups(pretrained)
    written, size, error = _write_files(pretrained, groups, folder)
    with every_rank_raises():
        if error is not None:
            raise error
    maps = all_gather_object((written, size))
    return on_source(lambda: _write_config_and_index(pretrained, folder, len(groups), maps))


def _use_source_conversions(pretrained: PreTrainedModel) -> None:
    """Names are reverted with the conversions rank 0's load used (the other ranks built their model from the
    config): every rank takes rank 0's."""
    conversions = all_gather_object(compat.weight_conversions(pretrained) if rank() == 0 else None)[0]
    if conversions is not None:
        compat.set_weight_conversions(pretrained, conversions)


def _write_files(
    pretrained: PreTrainedModel, groups: list[list[str]], folder: Path
) -> tuple[dict[str, str], int, Exception | None]:
    """Every rank gathers each file's tensors; file k's writer (rank k % world) keeps them and writes the file.
    Returns (checkpoint name -> file for the files this rank wrote, their bytes, the first error of this rank): the
    error is raised later, on every rank, once every rank is done gathering."""
    state = pretrained.state_dict(keep_vars=True)
    world = torch.distributed.get_world_size() if is_distributed() else 1
    total = len(groups)
    written: dict[str, str] = {}
    size = 0
    error: Exception | None = None
    for index, keys in enumerate(groups):
        writer = index % world == rank()
        tensors = {}
        for key in keys:
            full = _full_tensor(state[key])
            if writer:
                tensors[key] = full.to("cpu").contiguous()
            del full
        if writer and error is None:
            name = SAFE_WEIGHTS_NAME if total == 1 else SHARD_FILE.format(index=index + 1, total=total)
            try:
                tensors = compat.revert_weight_conversion(pretrained, tensors)
                save_file(tensors, folder / name, metadata={"format": "pt"})
            except Exception as exc:  # noqa: BLE001 - raised on every rank once every rank is done gathering
                error = exc
            else:
                written.update(dict.fromkeys(tensors, name))
                size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    return written, size, error


def _write_config_and_index(
    pretrained: PreTrainedModel, folder: Path, total: int, maps: list[tuple[dict[str, str], int]]
) -> Path:
    """Rank 0's last step: the config, the generation config and (for several files) the index, from every rank's
    (written names, bytes)."""
    pretrained.config.dtype = str(pretrained.dtype).removeprefix("torch.")
    pretrained.config.architectures = [_unsharded_class_name(pretrained)]
    pretrained.config.save_pretrained(folder)
    if pretrained.can_generate():
        pretrained.generation_config.save_pretrained(folder)
    if total > 1:
        weight_map = {key: file for rank_map, _ in maps for key, file in rank_map.items()}
        metadata = {"total_size": sum(s for _, s in maps), "total_parameters": pretrained.num_parameters()}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %d safetensors file(s) from %d rank(s) to %s", total, len(maps), folder)
    return folder
