"""PEFT adapters out of (and back into) an FSDP2-sharded model, moving only the trainable tensors.

`gather_adapter(model)` collects the full trainable tensors on rank 0 (one all-gather per trainable parameter;
frozen parameters and buffers are never gathered, so the base model never crosses the wire) and renames them the way `PeftModel.save_pretrained` does.
`save_adapter` writes `adapter_model.safetensors` + `adapter_config.json` atomically; `load_adapter` sends a saved
adapter from rank 0 into the shards (used to resume). All three are collectives: every rank calls them, and a failure
on rank 0 (a file that cannot be written or read) is raised as the same exception on every rank.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from ..distributed import is_distributed, is_main, on_source

logger = logging.getLogger(__name__)

T = TypeVar("T")


def adapter_folder(adapter: str | os.PathLike) -> Path:
    """The local folder of a saved PEFT adapter: `adapter` itself when it is a folder, else a Hub repo id whose
    adapter files are fetched into (or found in) the Hugging Face cache, as `PeftModel.from_pretrained` finds them."""
    if os.path.isdir(adapter):
        return Path(adapter)
    from huggingface_hub import snapshot_download

    patterns = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "*.json", "*.jinja", "*.md", "*.model", "*.txt"]
    return Path(snapshot_download(str(adapter), allow_patterns=patterns))


def peft_model_of(model: nn.Module):
    """The `PeftModel` in `model`'s tree (the model itself, or inside a wrapper), or None."""
    from peft import PeftModel

    return next((m for m in model.modules() if isinstance(m, PeftModel)), None)


def _require_peft(model: nn.Module):
    peft_model = peft_model_of(model)
    if peft_model is None:
        raise ValueError(f"{type(model).__name__} holds no PeftModel: there is no adapter to save or load")
    return peft_model


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters, by name, on rank 0 ({} on the other ranks). A collective.

    Each sharded (DTensor) trainable parameter is all-gathered on its own; frozen parameters and buffers are never
    touched, so for LoRA only the adapter crosses the wire. Every rank walks the parameters in the same order."""
    main = is_main()
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if main:
            out[name] = tensor.cpu().clone()
    return out


def _peft_keys(peft_model, names: list[str], adapter_name: str) -> dict[str, str]:
    """model parameter name -> the key `PeftModel.save_pretrained` writes for it (adapter name removed)."""
    from peft import get_peft_model_state_dict

    prefix = _prefix_of(peft_model, names)
    placeholders = {name[len(prefix) :]: torch.empty(0) for name in names}
    renamed = get_peft_model_state_dict(peft_model, state_dict=dict(placeholders), adapter_name=adapter_name)
    # peft only drops the adapter name (and filters); map each kept key back to its parameter by that rule.
    out = {}
    for name in placeholders:
        key = name.replace(f".{adapter_name}", "")
        if key in renamed:
            out[prefix + name] = key
    return out


def _prefix_of(peft_model, names: list[str]) -> str:
    """What wrappers add before the PeftModel's own parameter names (usually '')."""
    own = next((n for n, p in peft_model.named_parameters() if p.requires_grad), None)
    if own is None or not names:
        return ""
    match = next((n for n in names if n.endswith(own)), None)
    return match[: len(match) - len(own)] if match else ""


def gather_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors as `PeftModel.save_pretrained` would write them. A collective: every rank calls it.

    Args:
        model: the (sharded) model holding a `PeftModel`.
        adapter_name: the PEFT adapter to gather.

    Returns:
        The adapter's full CPU tensors by PEFT file name on rank 0, `{}` on the other ranks.

    Raises:
        ValueError: `model` holds no `PeftModel`.
    """
    peft_model = _require_peft(model)
    state = gather_trainable(model)
    if not is_main():
        return {}
    keys = _peft_keys(peft_model, list(state), adapter_name)
    missing = sorted(set(state) - set(keys))
    if missing:
        logger.warning(
            "%d trainable tensor(s) are not part of the adapter and are not saved: %s", len(missing), missing[:5]
        )
    return {keys[name]: state[name].contiguous() for name in keys}


def save_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write the adapter in PEFT format to `output_dir` (rank 0); every rank must call it (it gathers).

    The files are written into a temporary folder beside `output_dir` and moved in one by one, weights first and
    `adapter_config.json` last, so an interrupted save never leaves a folder that `PeftModel.from_pretrained` would
    take for a complete adapter with missing or half-written weights.

    Args:
        model: the (sharded) model holding a `PeftModel`.
        output_dir: the adapter folder to write (created if missing).
        adapter_name: the PEFT adapter to save (its config is written with `inference_mode=True`).
        state_dict: the adapter's tensors when already gathered (`gather_adapter`); gathered here when None.

    Returns:
        The folder on rank 0, None on the other ranks.

    Raises:
        ValueError: `model` holds no `PeftModel`. A failed write on rank 0 is raised on every rank.
    """
    peft_model = _require_peft(model)
    tensors = gather_adapter(model, adapter_name) if state_dict is None else state_dict
    output_dir = Path(output_dir)

    def write() -> Path:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
        try:
            save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            config = copy.deepcopy(peft_model.peft_config[adapter_name])
            config.inference_mode = True  # what `PeftModel.save_pretrained` writes
            config.save_pretrained(staging)
            (output_dir / ADAPTER_CONFIG).unlink(missing_ok=True)
            os.replace(staging / ADAPTER_WEIGHTS, output_dir / ADAPTER_WEIGHTS)
            os.replace(staging / ADAPTER_CONFIG, output_dir / ADAPTER_CONFIG)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        n = sum(t.numel() for t in tensors.values())
        logger.info("saved a PEFT adapter (%d tensors, %.2fM parameters) to %s", len(tensors), n / 1e6, output_dir)
        return output_dir

    # A failed write on rank 0 raises the same error on every rank (no rank goes on as if the adapter had been saved,
    # to wait in the next collective).
    return on_source(write)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load a PEFT adapter saved by `save_adapter` into `model`'s (sharded) adapter parameters, from rank 0's disk.

    Every rank calls it; only rank 0 reads the file.

    Args:
        model: the (sharded) model holding a `PeftModel` of the same configuration.
        adapter_dir: a folder with `adapter_model.safetensors`.
        adapter_name: the PEFT adapter whose parameters are filled.

    Raises:
        ValueError: `model` holds no `PeftModel`, or the file lacks one of its adapter tensors (on every rank).
    """
    peft_model = _require_peft(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    keys = _peft_keys(peft_model, names, adapter_name)

    def read() -> dict[str, torch.Tensor]:
        path = Path(adapter_dir) / ADAPTER_WEIGHTS
        stored = load_file(path)
        absent = sorted(key for key in keys.values() if key not in stored)
        if absent:
            raise ValueError(f"{path} lacks {len(absent)} adapter tensor(s), e.g. {absent[:3]}")
        return {name: stored[key] for name, key in keys.items()}

    state = on_source(read) or {}  # a failed read raises the same error on every rank
    if is_distributed():
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, state, options=options)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
