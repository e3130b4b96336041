"""Trainer checkpoints of a model sharded by hf_dsv4's FSDP2 plugin, in the layout its `fsdp_state_dict_type` asks for.

- `SHARDED_STATE_DICT` (the FSDP2 default, and what `accelerate_configs/` set): every rank writes its own shards with
  torch DCP, nothing is gathered: the optimizer state of the trainable parameters in `optimizer_0/` and, for full
  fine-tuning, the model in `pytorch_model_fsdp_0/` (accelerate's folder names and `{"optimizer": ...}` /
  `{"model": ...}` keys, so the folders are those of the stock Trainer's FSDP checkpoints).
- `FULL_STATE_DICT`: gathered on rank 0: `optimizer.pt`, and for full fine-tuning the model as `save_pretrained`
  writes it.

A LoRA checkpoint always holds the adapter in PEFT format (`adapter_model.safetensors`), whatever the mode. Loading
reads a checkpoint as it was written (by the files in it), so a run may resume under the other mode: DCP re-shards
on load. Every function here is a collective: every rank calls it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils.constants import FSDP_MODEL_NAME
from accelerate.utils.constants import OPTIMIZER_NAME as OPTIMIZER_PREFIX
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers.trainer import OPTIMIZER_NAME

from ..distributed import all_gather_object, is_main, on_source
from ..loading.units import pretrained_models

logger = logging.getLogger(__name__)

MODEL_SHARDS = f"{FSDP_MODEL_NAME}_0"  # pytorch_model_fsdp_0/
OPTIMIZER_SHARDS = f"{OPTIMIZER_PREFIX}_0"  # optimizer_0/
SHARDED = "SHARDED_STATE_DICT"
FULL = "FULL_STATE_DICT"


def state_dict_mode(plugin) -> str:
    """ "SHARDED_STATE_DICT" or "FULL_STATE_DICT": how an FSDP plugin's checkpoints are written."""
    mode = str(getattr(plugin.state_dict_type, "name", plugin.state_dict_type)).rsplit(".", 1)[-1]
    if mode not in (SHARDED, FULL):
        raise ValueError(f"fsdp_state_dict_type {mode} is not supported with FSDP2: use {SHARDED} or {FULL}")
    return mode


# ------------------------------------------------------------------------------------------------------ sharded


def save_sharded_model(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Each rank writes its shards of the model's state dict to `checkpoint/pytorch_model_fsdp_0/` (DCP)."""
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=Path(checkpoint) / MODEL_SHARDS)


def load_sharded_model(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Each rank reads its shards of `checkpoint/pytorch_model_fsdp_0/` into the model (DCP re-shards as needed)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=Path(checkpoint) / MODEL_SHARDS)
    set_model_state_dict(model, state["model"])


def save_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike) -> None:
    """Each rank writes its shards of the optimizer state (trainable parameters only) to `checkpoint/optimizer_0/`."""
    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": state}, checkpoint_id=Path(checkpoint) / OPTIMIZER_SHARDS)


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike) -> None:
    """Each rank reads its shards of `checkpoint/optimizer_0/` into the optimizer. A parameter that had no state when
    it was saved (AdamW creates it on the first gradient, and a module the data has not reached yet has none) gets
    none back, as in the run that was not interrupted."""
    folder = Path(checkpoint) / OPTIMIZER_SHARDS
    saved = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    state = get_optimizer_state_dict(model, optimizer)  # every parameter with a (fresh) state, as DCP needs shapes
    state["state"] = {
        name: values
        for name, values in state["state"].items()
        if all(f"optimizer.state.{name}.{key}" in saved for key in values)
    }
    loaded = {"optimizer": state}
    dcp.load(loaded, checkpoint_id=folder)
    # strict=False: the parameters without saved state are expected (see above)
    set_optimizer_state_dict(model, optimizer, loaded["optimizer"], options=StateDictOptions(strict=False))


# --------------------------------------------------------------------------------------------- full (rank 0)


def save_full_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike, should_save: bool
) -> None:
    """The optimizer state gathered on rank 0 (full tensors, CPU) and written to `checkpoint/optimizer.pt`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if should_save:
        torch.save(state, Path(checkpoint) / OPTIMIZER_NAME)


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike) -> None:
    """`checkpoint/optimizer.pt`, read on rank 0 and sent into every rank's shards."""
    path = Path(checkpoint) / OPTIMIZER_NAME
    state = on_source(lambda: torch.load(path, map_location="cpu", weights_only=True)) or {}
    # strict=False: a parameter that had no state when saved gets none (see `load_sharded_optimizer`)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def save_full_model(model: nn.Module, checkpoint: str | os.PathLike, should_save: bool) -> None:
    """The model gathered on rank 0 (CPU) and written by its `save_pretrained`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if should_save:
        pretrained_models(model)[0].save_pretrained(checkpoint, state_dict=state)


def load_full_model(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """A model that `save_full_model` wrote, loaded on rank 0 by its class's `from_pretrained` (names converted as for
    any checkpoint, dtypes as the training model's) and sent into every rank's shards."""
    pretrained = pretrained_models(model)[0]

    def read() -> dict[str, torch.Tensor]:
        loaded = type(pretrained).from_pretrained(checkpoint, dtype=pretrained.dtype, device_map="cpu")
        return loaded.state_dict()

    state = on_source(read) or {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ------------------------------------------------------------------------------------------------ dispatching


def _sharded_on_source(folder: Path) -> bool:
    """Whether rank 0 sees `folder` (every rank takes the same branch, whatever its own disk shows)."""
    return all_gather_object(folder.is_dir() if is_main() else None)[0]


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | os.PathLike) -> None:
    """The optimizer state of `checkpoint`, sharded (`optimizer_0/`) or full (`optimizer.pt`), into the shards."""
    if _sharded_on_source(Path(checkpoint) / OPTIMIZER_SHARDS):
        load_sharded_optimizer(model, optimizer, checkpoint)
    else:
        load_full_optimizer(model, optimizer, checkpoint)


def load_model(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """The full fine-tuned model of `checkpoint`, sharded (`pytorch_model_fsdp_0/`) or saved whole, into the shards."""
    if _sharded_on_source(Path(checkpoint) / MODEL_SHARDS):
        load_sharded_model(model, checkpoint)
    else:
        load_full_model(model, checkpoint)
