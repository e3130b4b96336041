"""Rank-aware `from_pretrained`: only the source rank reads the checkpoint, every other rank builds on meta.

transformers 5 reads and converts the whole checkpoint on every rank, so N ranks on a node need N times the host
RAM of the checkpoint (about 2.1x each, measured). Under `memory_efficient_init()` the source rank (global rank 0,
or local rank 0 of every node with `source_per_node=True`) loads real weights on CPU as usual, while every other
rank builds the same model from the config on the meta device and never opens a weight file. `shard_model` then
sends rank 0's weights into every FSDP shard.

Loading is a collective under the hook: every rank calls `from_pretrained`, and a failure on a source rank (a
corrupted or mismatched checkpoint) is raised as the same `CheckpointLoadError` on every rank instead of leaving
the others waiting in a later collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# `from_pretrained` keyword arguments that only matter for reading weights; dropped before building from the config.
LOAD_ONLY_KWARGS = (
    "state_dict", "proxies", "tqdm_class", "output_loading_info", "_from_pipeline", "_from_auto", "device_map",
    "max_memory", "offload_folder", "offload_buffers", "quantization_config", "_commit_hash", "variant",
    "adapter_kwargs", "adapter_name", "generation_config", "gguf_file", "distributed_config", "device_mesh",
    "tp_plan", "tp_size", "allow_all_kernels", "use_kernels", "kernel_config", "key_mapping", "mirror", "_fast_init",
    "low_cpu_mem_usage", "from_tf", "from_flax", "offload_state_dict", "ignore_mismatched_sizes", "use_safetensors",
    "weights_only", "disable_mmap", "fusion_config",
)  # fmt: skip
# Passed to the config loader (where the config comes from), never to the model.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


class CheckpointLoadError(RuntimeError):
    """A source rank could not load the checkpoint; raised with the same message on every rank."""


def is_distributed() -> bool:
    """True inside an initialized torch.distributed group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_source_rank(source_per_node: bool = False) -> bool:
    """Whether this process reads the checkpoint: global rank 0, or local rank 0 of each node if `source_per_node`."""
    if not is_distributed():
        return True
    if source_per_node:
        return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    return dist.get_rank() == 0


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs for the config loader, kwargs for `_from_config`): load-only arguments are dropped."""
    config_kwargs = {k: v for k, v in kwargs.items() if k not in LOAD_ONLY_KWARGS}
    model_kwargs = {}
    for key in ("dtype", "torch_dtype", "attn_implementation", "experts_implementation"):
        if key in config_kwargs:
            model_kwargs[key] = config_kwargs.pop(key)
    if "torch_dtype" in model_kwargs:
        model_kwargs.setdefault("dtype", model_kwargs["torch_dtype"])
        del model_kwargs["torch_dtype"]
    return config_kwargs, model_kwargs


def _resolve_dtype(dtype: Any, config: Any) -> torch.dtype:
    """The dtype `from_pretrained` would use: `"auto"`/None -> the config's dtype (fp32 if it has none)."""
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def build_on_meta(cls: type[PreTrainedModel], path: str | os.PathLike | None, *args, **kwargs) -> PreTrainedModel:
    """The model `cls.from_pretrained(path, *args, **kwargs)` would return, built from the config on the meta device.

    Parameters and buffers are meta tensors with the same names, shapes and dtypes (fp32-kept modules stay fp32);
    tied weights are tied; the model is in eval mode like `from_pretrained`'s. No weight file is opened.
    """
    config = kwargs.pop("config", None)
    config_kwargs, model_kwargs = _split_kwargs(kwargs)
    if config is None or isinstance(config, (str, os.PathLike)):
        config, unused = cls.config_class.from_pretrained(config or path, return_unused_kwargs=True, **config_kwargs)
    else:
        config = config.__class__.from_dict(config.to_dict())  # a copy, as `from_pretrained` does
        unused = {k: v for k, v in config_kwargs.items() if k not in HUB_KWARGS}
        for key in list(unused):
            if hasattr(config, key):
                setattr(config, key, unused.pop(key))
    unused = {k: v for k, v in unused.items() if k not in HUB_KWARGS}
    model_kwargs["dtype"] = _resolve_dtype(model_kwargs.get("dtype"), config)
    config.name_or_path = str(path) if path is not None else config.name_or_path
    with torch.device("meta"):
        model = cls._from_config(config, *args, **model_kwargs, **unused)
    model.tie_weights()
    return model.eval()


def _agree_on_load(error: BaseException | None) -> None:
    """Collective: every rank learns whether any source rank failed, and all raise the same error if one did."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise CheckpointLoadError(
            f"rank {rank} could not load the checkpoint: {message}. Check that every shard listed in "
            "model.safetensors.index.json is complete and matches config.json."
        ) from error


def _strict_loading_info(info: dict[str, Any]) -> None:
    """Raise on missing, unexpected or mismatched keys: randomly initialised weights would be broadcast silently."""
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        details = "; ".join(f"{k}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        raise ValueError(f"the checkpoint does not match the model ({details})")


@contextlib.contextmanager
def _threads_of_idle_ranks() -> Iterator[None]:
    """On a source rank, use the intra-op threads of the node's other ranks while they wait (converting the
    checkpoint, e.g. fusing experts, is mostly parallel torch ops); restored on exit."""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # one source per node, the others wait
    torch.set_num_threads(max(threads, min(threads * local_world, cores)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rank_aware_from_pretrained(original: classmethod, source_per_node: bool) -> classmethod:
    """A `from_pretrained` classmethod body that loads on source ranks and builds on meta elsewhere."""

    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        if not is_distributed():
            return original.__get__(None, cls)(pretrained_model_name_or_path, *args, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info, error = None, {}, None
        if is_source_rank(source_per_node):
            try:
                with _threads_of_idle_ranks():
                    model, info = original.__get__(None, cls)(
                        pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
                    )
                _strict_loading_info(info)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank by `_agree_on_load`
                error = exc
        else:
            try:
                model = build_on_meta(cls, pretrained_model_name_or_path, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                error = exc
        _agree_on_load(error)
        where = "loaded the weights" if is_source_rank(source_per_node) else "built the model on meta"
        logger.info("rank %d %s", dist.get_rank(), where)
        return (model, info) if want_info else model

    return classmethod(from_pretrained)


@contextlib.contextmanager
def memory_efficient_init(source_per_node: bool = False) -> Iterator[None]:
    """Scope under which `from_pretrained` reads the checkpoint on the source rank only.

    Inside the block, `AutoModelForCausalLM.from_pretrained(path, dtype=...)` (and the same method of any
    `PreTrainedModel` subclass) loads real weights on CPU on the source rank (global rank 0; local rank 0 of each
    node with `source_per_node=True`) and returns the same model built on the meta device elsewhere. Every rank must
    call it (it is a collective). Outside torch.distributed, or with one process, it is exactly `from_pretrained`.
    `PreTrainedModel.from_pretrained` is restored on exit, also on error.
    """
    original = PreTrainedModel.__dict__["from_pretrained"]
    PreTrainedModel.from_pretrained = _rank_aware_from_pretrained(original, source_per_node)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original
