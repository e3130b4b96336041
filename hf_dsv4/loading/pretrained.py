"""Rank-aware `from_pretrained`: only the source rank reads the checkpoint, every other rank builds on meta.

transformers 5 reads and converts the whole checkpoint on every rank, so N ranks on a node need N times the host
RAM of the checkpoint (about 2.1x each, measured). Under `memory_efficient_init()` the source rank (global rank 0)
loads real weights on CPU as usual, while every other rank builds the same model from the config on the meta device
and never opens a weight file. `hf_dsv4.sharding.shard_model` then sends rank 0's weights into every FSDP shard.

Loading is a collective under the hook: every rank calls `from_pretrained`, and a failure on any rank (a corrupted
or mismatched checkpoint) is raised as the same `CheckpointLoadError` on every rank
(`hf_dsv4.distributed.every_rank_raises`) instead of leaving the others waiting in a later collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from .. import compat
from ..distributed import all_gather_object, every_rank_raises, is_distributed, rank
from ..formats import EXPERTS_MODES
from .stream import (
    StreamedCheckpoint,
    StreamSource,
    dequantizing_config,
    fp8_block_size,
    open_streamed,
    register_stream_source,
    without_hub_kernels,
)
from .units import tensor_table

logger = logging.getLogger(__name__)

# `from_pretrained` keyword arguments that only matter for reading weights; dropped before building from the config.
LOAD_ONLY_KWARGS = (
    "state_dict", "proxies", "tqdm_class", "output_loading_info", "_from_pipeline", "_from_auto", "device_map",
    "max_memory", "offload_folder", "offload_buffers", "quantization_config", "_commit_hash", "variant",
    "adapter_kwargs", "adapter_name", "generation_config", "gguf_file", "distributed_config", "device_mesh",
    "tp_plan", "tp_size", "allow_all_kernels", "use_kernels", "kernel_config", "key_mapping", "mirror", "_fast_init",
    "low_cpu_mem_usage", "from_tf", "from_flax", "offload_state_dict", "ignore_mismatched_sizes", "use_safetensors",
    "weights_only", "disable_mmap", "fusion_config", "kernels_mode",
)  # fmt: skip
# Passed to the config loader (where the config comes from), never to the model.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")
# Passed to the model's constructor (`_from_config`).
MODEL_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "experts_implementation")


class CheckpointLoadError(RuntimeError):
    """A rank could not load (or build) the model; raised with the same message on every rank."""


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs for the config loader, kwargs for `_from_config`): load-only arguments are dropped."""
    config_kwargs = {k: v for k, v in kwargs.items() if k not in LOAD_ONLY_KWARGS}
    model_kwargs = {}
    for key in MODEL_KWARGS:
        if key in config_kwargs:
            model_kwargs[key] = config_kwargs.pop(key)
    if "torch_dtype" in model_kwargs:
        model_kwargs.setdefault("dtype", model_kwargs["torch_dtype"])
        del model_kwargs["torch_dtype"]
    return config_kwargs, model_kwargs


def resolve_dtype(
    dtype: str | torch.dtype | None, default: str | torch.dtype | None = None, auto: torch.dtype | None = None
) -> torch.dtype | str | None:
    """A `dtype` argument as `from_pretrained` reads it: None -> `default`; "auto" -> `auto` (the checkpoint's dtype,
    when known; else "auto" is kept for `from_pretrained` to resolve); a name ("bfloat16") -> the torch dtype.

    Args:
        dtype: a `torch.dtype`, its name, "auto" or None.
        default: what None stands for (itself resolved the same way).
        auto: the checkpoint's dtype, what "auto" stands for; None when it is not known.

    Returns:
        A `torch.dtype`, "auto", or None (no `dtype` and no `default`).
    """
    if dtype is None:
        dtype = default
    if dtype == "auto":
        return "auto" if auto is None else auto
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def build_on_meta(cls: type[PreTrainedModel], path: str | os.PathLike | None, *args, **kwargs) -> PreTrainedModel:
    """The model `cls.from_pretrained(path, *args, **kwargs)` would return, built from the config on the meta device.

    Parameters and buffers are meta tensors with the same names, shapes and dtypes (fp32-kept modules stay fp32);
    tied weights are tied; the model is in eval mode like `from_pretrained`'s. No weight file is opened.

    Args:
        cls: the `PreTrainedModel` class (e.g. `DeepseekV4ForCausalLM`).
        path: the checkpoint folder or Hub id its config is read from (None with a `config` object).
        *args, **kwargs: `from_pretrained`'s (`config`, `dtype`, `attn_implementation`, ...); load-only ones are
            ignored.

    Returns:
        The model on the meta device.
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
    checkpoint_dtype = resolve_dtype(getattr(config, "dtype", None), default=torch.float32)
    model_kwargs["dtype"] = resolve_dtype(model_kwargs.get("dtype"), default=checkpoint_dtype, auto=checkpoint_dtype)
    config.name_or_path = str(path) if path is not None else config.name_or_path
    with torch.device("meta"):
        model = compat.from_config(cls, config, *args, **model_kwargs, **unused)
    model.tie_weights()
    return model.eval()


def _strict_loading_info(info: dict[str, Any]) -> None:
    """Raise on missing, unexpected or mismatched keys: randomly initialised weights would be broadcast silently."""
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        details = "; ".join(f"{k}: {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        raise ValueError(f"the checkpoint does not match the model ({details})")


@contextlib.contextmanager
def threads_of_idle_ranks() -> Iterator[None]:
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


READERS = ("rank0", "all")
# How long the other ranks wait for a Hub download (Flash's release is ~160 GB): NCCL's default group would time out
# after 10-30 minutes, so they wait in a gloo group of their own with this timeout instead.
DOWNLOAD_TIMEOUT = timedelta(hours=12)
# What from_pretrained reads from a Hub repository (config, index, weights, generation config).
DOWNLOADED_FILES = ["*.json", "*.safetensors"]


def _download(repo_id: str, kwargs: dict[str, Any]) -> str:
    """A local snapshot of the files `from_pretrained` reads from `repo_id` (huggingface_hub's `snapshot_download`
    into the Hugging Face cache, with the caller's cache_dir, revision, token, force_download, local_files_only)."""
    from huggingface_hub import snapshot_download

    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision")
    hub = {k: kwargs[k] for k in keys if kwargs.get(k) is not None}
    return snapshot_download(repo_id, allow_patterns=DOWNLOADED_FILES, **hub)


def _downloaded_first(path: Any, kwargs: dict[str, Any], each_machine: bool) -> Any:
    """`path`, or where a Hub id was downloaded on this machine: the ranks that will read the weights (rank 0; with
    `each_machine` the lowest rank of each machine, into its own cache) download it first, before any collective that
    runs under the process group's timeout, while every other rank waits in a gloo group that allows
    `DOWNLOAD_TIMEOUT`. A failed download is raised on every rank. The ranks of a machine that downloaded get its
    snapshot folder; on a machine that did not, the Hub id stays (those ranks read config.json only). A collective."""
    seen = all_gather_object((socket.gethostname(), os.path.isdir(str(path))))
    if all(local for _, local in seen):
        return path
    hosts = [host for host, _ in seen]
    leader = hosts.index(hosts[rank()])
    downloads = leader == rank() if each_machine else rank() == 0
    waiting = dist.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT)
    local = None
    try:
        with every_rank_raises(group=waiting), _load_errors():
            if downloads:
                logger.info("rank %d: downloading %s (the other ranks wait up to %s)", rank(), path, DOWNLOAD_TIMEOUT)
                local = _download(str(path), kwargs)
        snapshots = all_gather_object(local, group=waiting)
    finally:
        dist.destroy_process_group(waiting)
    return snapshots[leader] or path


def plan_streamed(cls: type, path: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, dict, Any]:
    """(the meta model built from the config, the `from_pretrained` kwargs that read it, the FP8 block size or
    None): a release checkpoint is read dequantized into the requested dtype, on a GPU machine too."""
    model = build_on_meta(cls, path, *args, **dict(kwargs))
    if "quantization_config" in kwargs:
        raise ValueError("streamed loading reads the weights dequantized: pass no quantization_config")
    quantized = getattr(model.config, "quantization_config", None)
    fp8_block = None
    if quantized is not None:
        kwargs = {**kwargs, "quantization_config": dequantizing_config(quantized)}
        fp8_block = fp8_block_size(quantized)
        del model.config.quantization_config  # as transformers leaves a dequantized model's config
    return model, kwargs, fp8_block


def open_reader(
    model: Any,
    original: classmethod,
    cls: type,
    path: Any,
    args: tuple,
    kwargs: dict,
    fp8_block: Any,
    keep_quantized: bool = False,
) -> StreamedCheckpoint:
    """Open the checkpoint (stock `from_pretrained` without reading weights) as a `StreamedCheckpoint`; its twin
    (what stock `from_pretrained` builds) must have the same tensors as `model`, built from the config."""
    with threads_of_idle_ranks():
        stream = open_streamed(cls, original, path, args, kwargs, fp8_block)
    stream.keep_quantized = keep_quantized
    if keep_quantized and not stream.quantized:
        raise ValueError(
            f"keep_quantized: {path} holds no quantized (FP8 / FP4) weights; load it without keep_quantized"
        )
    built, planned = tensor_table(model), tensor_table(stream.twin)
    if built != planned:
        differ = sorted(n for n in built.keys() | planned.keys() if built.get(n) != planned.get(n))
        raise ValueError(
            f"from_pretrained builds {len(differ)} tensor(s) differently from the config (e.g. {differ[0]}: "
            f"{planned.get(differ[0])} vs {built.get(differ[0])}); a quantized model cannot be streamed yet"
        )
    return stream


@contextlib.contextmanager
def _load_errors() -> Iterator[None]:
    """Any failure to load on this rank as a CheckpointLoadError naming the rank."""
    try:
        yield
    except Exception as exc:
        raise CheckpointLoadError(
            f"rank {rank()} could not load the checkpoint: {type(exc).__name__}: {exc}. Check that every shard listed "
            "in model.safetensors.index.json is complete and matches config.json."
        ) from exc


def _load(original: classmethod, cls: type, path: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, dict]:
    """(model, loading info) on the source rank; (meta model, {}) elsewhere. Any failure is a CheckpointLoadError."""
    with _load_errors():
        if rank() != 0:
            return build_on_meta(cls, path, *args, **kwargs), {}
        with threads_of_idle_ranks():
            model, info = original.__get__(None, cls)(path, *args, output_loading_info=True, **kwargs)
        _strict_loading_info(info)
        return model, info


def _load_streamed(
    original: classmethod,
    cls: type,
    path: Any,
    args: tuple,
    kwargs: dict,
    readers: str,
    read_budget: int | None,
    keep_quantized: bool | str = False,
) -> Any:
    """The meta model on every rank, its `StreamSource` registered for `shard_model`: with a reader of the checkpoint
    on the ranks that read it (rank 0, or every rank with `readers="all"`). A collective: each step's failure is
    raised on every rank."""
    with every_rank_raises(), _load_errors():
        model, kwargs, fp8_block = plan_streamed(cls, path, args, kwargs)
    experts = keep_quantized if isinstance(keep_quantized, str) else "per_expert"
    source = StreamSource(readers, read_budget, bool(keep_quantized), experts)
    with every_rank_raises(), _load_errors():  # a Hub id is on every reading machine by now (`_downloaded_first`)
        if readers == "all" or rank() == 0:
            reader = open_reader(model, original, cls, path, args, kwargs, fp8_block, source.keep_quantized)
            source.checkpoint = reader
    register_stream_source(model, source)
    return model


def _config_as_on_source(model: Any) -> None:
    """A checkpoint that rank 0 loaded dequantized (FP8 on a machine without a suitable GPU) leaves no
    `quantization_config` on its config: the ranks that built from config.json drop theirs too, so every rank's config
    (and what a later save writes) is rank 0's."""
    dequantized = all_gather_object(getattr(model.config, "quantization_config", None) is None)[0]
    if dequantized and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _rank_aware_from_pretrained(
    original: classmethod,
    stream: bool = False,
    readers: str = "rank0",
    read_budget: int | None = None,
    keep_quantized: bool | str = False,
) -> classmethod:
    """A `from_pretrained` classmethod body that loads on the source rank and builds on meta elsewhere (with
    `stream`: builds on meta everywhere, rank 0 keeping a reader of the checkpoint)."""

    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        if not is_distributed() and not keep_quantized:
            return original.__get__(None, cls)(pretrained_model_name_or_path, *args, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        kwargs = without_hub_kernels(kwargs)
        asked = pretrained_model_name_or_path
        if is_distributed():  # a Hub id is downloaded before the collectives that run under NCCL's timeout
            each_machine = stream and readers == "all"
            pretrained_model_name_or_path = _downloaded_first(asked, kwargs, each_machine)
        if stream:  # a failure on any rank is raised on every rank, never left as a hang
            path = pretrained_model_name_or_path
            model = _load_streamed(original, cls, path, args, kwargs, readers, read_budget, keep_quantized)
            info = {}
            logger.info("rank %d built the model on meta; shard_model streams the weights in", rank())
        else:
            with every_rank_raises():
                model, info = _load(original, cls, pretrained_model_name_or_path, args, kwargs)
            _config_as_on_source(model)
            logger.info("rank %d %s", rank(), "loaded the weights" if rank() == 0 else "built the model on meta")
        if asked is not None:
            model.config.name_or_path = str(asked)  # what the caller named, as stock from_pretrained keeps it
        return (model, info) if want_info else model

    from_pretrained.__hf_dsv4_rank_aware__ = True
    return classmethod(from_pretrained)


@contextlib.contextmanager
def memory_efficient_init(
    stream: bool = False,
    readers: str = "rank0",
    read_budget: int | None = None,
    keep_quantized: bool | str = False,
) -> Iterator[None]:
    """Scope under which `from_pretrained` reads the checkpoint on the source rank (global rank 0) only.

    Inside the block, `AutoModelForCausalLM.from_pretrained(path, dtype=...)` (and the same method of any
    `PreTrainedModel` subclass) loads real weights on CPU on rank 0 and returns the same model built on the meta
    device elsewhere. Every rank must call it (it is a collective). Outside torch.distributed, or with one process,
    it is exactly `from_pretrained`. Nesting is harmless: an inner block changes nothing.
    `PreTrainedModel.from_pretrained` is restored on exit, also on error.

    Args:
        stream: no rank reads weights in `from_pretrained`: every rank gets the model on the meta device, with a
            `StreamSource` registered for it (`hf_dsv4.loading.stream.stream_source(model)`; rank 0's holds a reader
            of the checkpoint: files, transformers' conversion plan), and `shard_model` streams the checkpoint into
            the shards one decoder layer at a time, so rank 0 never holds the whole model (`hf_dsv4.loading.stream`).
            The checkpoint must be safetensors files; a LoRA adapter may be added before `shard_model` (its factors
            are drawn on rank 0 when the shards are filled).
        readers: with `stream=True`, "rank0" (default) reads on rank 0 and sends each unit into the shards; "all" has
            every rank read only the rows its own shards hold (an FP8 weight's rows widened to its 128-row scale
            blocks, the routed experts it holds), so no weight crosses ranks: for machines that each see the
            checkpoint files (a shared or local copy). A Hub id is then downloaded once per machine, by its lowest
            rank, into the Hugging Face cache. Any Hub id is downloaded before the first collective that runs under
            the process group's timeout (NCCL's: 10-30 minutes, shorter than Flash's ~160 GB), the other ranks
            waiting up to `DOWNLOAD_TIMEOUT` (12 hours).
        read_budget: with `stream=True`, bytes: rank 0 reads each rank's rows in pieces of at most that many
            converted bytes and sends each to its rank, instead of reading whole units (with `readers="all"`: every
            rank reads its own rows in such pieces); see `shard_model`.
        keep_quantized: with `stream=True` and a release checkpoint, the weights the checkpoint stores as FP8 / FP4
            stay so in the shards (uint8 codes + ue8m0 scales, dequantized where an op uses them, in forward and
            again in backward, `hf_dsv4.sharding.quantized`), for LoRA over a frozen base; `shard_model` gives the model that
            form. Needs torch.distributed (one process is fine: `shard_model` fills it) and refuses full
            fine-tuning. The routed experts compute expert by expert (`True` or "per_expert": each expert's weight
            dequantized when its tokens reach it) or as one dequantized stack per layer ("stack": the model's experts
            implementation, e.g. grouped_mm); see `hf_dsv4.sharding.quantize_base`.

    Raises:
        ValueError: an unknown `readers` or `keep_quantized`, a `read_budget` below 1 byte, or `readers`,
            `read_budget` or `keep_quantized` without `stream=True`.
        CheckpointLoadError: a `from_pretrained` inside the block failed on some rank (raised on every rank).
    """
    if readers not in READERS:
        raise ValueError(f"readers must be one of {READERS}, not {readers!r}")
    if (readers != "rank0" or read_budget is not None) and not stream:
        raise ValueError("readers and read_budget apply to a streamed checkpoint: pass stream=True")
    if keep_quantized not in (False, True, *EXPERTS_MODES):
        raise ValueError(f"keep_quantized must be True, False or one of {EXPERTS_MODES}, not {keep_quantized!r}")
    if keep_quantized and not stream:
        raise ValueError("keep_quantized applies to a streamed checkpoint: pass stream=True")
    if read_budget is not None and read_budget < 1:
        raise ValueError(f"read_budget is a positive number of bytes, not {read_budget!r}")
    original = PreTrainedModel.__dict__["from_pretrained"]
    if getattr(original.__func__, "__hf_dsv4_rank_aware__", False):
        yield  # already inside a memory_efficient_init block: one hook, one agreement per load
        return
    PreTrainedModel.from_pretrained = _rank_aware_from_pretrained(
        original, stream, readers, read_budget, keep_quantized
    )
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original
