"""Streamed loading: the checkpoint is read into the FSDP2 shards one unit (decoder layer, then the rest) at a time,
so no rank ever holds the whole model, rank 0 included.

Under `memory_efficient_init(stream=True)` every rank's `from_pretrained` returns the model on the meta device and
registers a `StreamSource` for it (`stream_source(model)`), which `shard_model` takes as its `stream` argument. On
rank 0 the source holds a `StreamedCheckpoint`: stock `from_pretrained` was run with its weight reading left
out (`compat.weights_not_read`), which builds a meta twin of the model exactly as transformers would (quantizer,
dtypes, fp32-kept modules, non-persistent buffers computed) and records the checkpoint files and the load plan.
`shard_model` then asks it for one unit at a time: the unit's checkpoint tensors are opened as safetensors slices
(read with pread: mapped pages would count in rank 0's memory) and loaded into the twin by transformers' own conversion (`convert_and_load_state_dict_in_model`:
renames, expert fusion, FP8/FP4 dequantization, cast), handed over, and the twin's unit goes back to meta.

Every checkpoint tensor is assigned to its unit before any weight is read (transformers' own renaming rules), so a
checkpoint that lacks a tensor of the model, or holds one the model does not know, fails in `from_pretrained`.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .. import compat
from ..formats import quantized_parts
from .units import in_unit, layer_units, non_persistent_buffers, pretrained_models

logger = logging.getLogger(__name__)


class StreamedCheckpoint:
    """Rank 0's reader of one checkpoint, unit by unit (see the module docstring). `read(prefix)` returns the unit's
    tensors under the model's names, fully converted; `non_persistent_buffers()` the buffers no checkpoint holds."""

    def __init__(
        self, twin: nn.Module, checkpoint_files: list[str], load_config: Any, fp8_block: tuple[int, int] | None = None
    ):
        self.twin = twin
        self.keep_quantized = False  # quantized weights read as stored (`read_quantized`), not dequantized
        self.load_config = load_config
        self.files = [Path(f) for f in checkpoint_files]
        self._handles: dict[Path, Any] = {}
        meta_state = twin.state_dict()
        self._shapes = {name: tensor.shape for name, tensor in meta_state.items()}  # restored by `_release`
        self.targets: dict[str, str] = {}  # checkpoint key -> the model tensor it feeds
        self.file_of: dict[str, Path] = {}  # checkpoint key -> its file
        self.prefixes = [prefix for prefix, _ in layer_units(twin)]
        self.groups: dict[str, dict[str, Path]] = {prefix: {} for prefix in self.prefixes}
        produced: set[str] = set()
        skipped = []
        ignored = [re.compile(p) for p in getattr(twin, "_keys_to_ignore_on_load_unexpected", None) or ()]
        files = {key: file for file in self.files for key in self._open(file).keys()}
        for key, target in compat.model_keys_of(twin, load_config, files).items():
            file = files[key]
            if target not in meta_state:
                if any(p.search(key) or p.search(target) for p in ignored):
                    skipped.append(key)
                    continue
                raise ValueError(f"{file.name}: tensor '{key}' is not part of the model (as '{target}')")
            produced.add(target)
            self.targets[key], self.file_of[key] = target, file
            unit = next(p for p in self.prefixes if target.startswith(p))  # "" (the rest) comes last
            self.groups[unit][key] = file
        if fp8_block is not None:
            self._check_block_scales(fp8_block)
        missing = sorted(set(meta_state) - produced)
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) of the model: {shown}")
        if skipped:
            logger.info("skipping %d checkpoint tensor(s) the model does not use (e.g. %s)", len(skipped), skipped[0])

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu", backend="pread")
            except Exception as exc:
                raise ValueError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        return self._handles[file]

    def _check_block_scales(self, block: tuple[int, int]) -> None:
        """Every quantized weight must be a whole number of its scale blocks: FP8 e4m3 weights `block` (128 x 128),
        FP4 e2m1 experts (two per int8 byte) 1 x 32. transformers infers the block size from the shapes, so a
        192-row weight with 2 row scales (DeepSeek: 128 + 64) would be dequantized silently wrong (96 + 96)."""
        where = self.file_of
        for key, file in where.items():
            if not key.endswith(".scale"):
                continue
            weight_key = key[: -len("scale")] + "weight"
            if weight_key not in where:
                raise ValueError(f"{file.name}: scale '{key}' has no weight '{weight_key}'")
            weight = self._open(where[weight_key]).get_slice(weight_key)
            scale = self._open(file).get_slice(key).get_shape()
            shape, dtype = weight.get_shape(), weight.get_dtype()
            if dtype == "I8":  # FP4: two values per byte along the input dimension, 32 per scale
                expected = [shape[0], shape[1] * 2 // 32] if len(shape) == 2 and (shape[1] * 2) % 32 == 0 else None
            elif dtype.startswith("F8"):
                whole = len(shape) == 2 and shape[0] % block[0] == 0 and shape[1] % block[1] == 0
                expected = [shape[0] // block[0], shape[1] // block[1]] if whole else None
            else:
                raise ValueError(f"{where[weight_key].name}: '{weight_key}' has a scale but is {dtype}, not FP8 / FP4")
            if expected != list(scale):
                raise ValueError(
                    f"{where[weight_key].name}: '{weight_key}' {list(shape)} ({dtype}) is not a whole number of "
                    f"{'1 x 32' if dtype == 'I8' else f'{block[0]} x {block[1]}'} blocks for its scale {list(scale)}; "
                    "transformers would dequantize it with a block size inferred from the shapes"
                )

    def read(
        self, prefix: str, rows: dict[str, tuple[int, int]] | None = None, only: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The unit `prefix` ("model.layers.N." or "" for everything outside the decoder layers), converted; the
        names are the model's state-dict names without `prefix`. The twin's copy goes back to meta afterwards.

        `rows` ({model tensor name: (start, stop)}) asks for only those rows (dim 0, the dimension FSDP2 shards) of
        those tensors: only the checkpoint rows they come from are read and converted (`_row_plan`). `only` (model
        tensor names) reads just those tensors of the unit."""
        rows, raw = dict(rows or {}), {}
        if self.keep_quantized:
            parts = self._quantized_parts(prefix)
            asked = set(parts) if only is None else set(only) & set(parts)
            only = {t for t in self._targets_of(prefix) if t not in self.quantized} if only is None else only - asked
            try:
                raw = {name[len(prefix) :]: self._read_raw(*parts[name], rows.pop(name, None)) for name in asked}
            except Exception as exc:
                raise ValueError(f"reading the quantized weights of '{prefix or 'the rest'}' failed: {exc}") from exc
            if not only:
                return raw
        plan = self._row_plan(prefix, rows, only)
        try:
            self._set_local_shapes(plan.shapes)
            info = compat.convert_into(self.twin, plan.tensors, self.load_config)
            unit = self._collect(prefix, plan) | raw
        except Exception as exc:
            files = ", ".join(sorted({file.name for file in self.groups[prefix].values()}))
            raise ValueError(
                f"reading '{prefix or 'the rest'}' from {files} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._release(prefix)
        problems = {
            "mismatched": sorted(map(str, getattr(info, "mismatched_keys", ()) or ())),
            "conversion errors": sorted(map(str, (getattr(info, "conversion_errors", None) or {}).items())),
            "errors": list(getattr(info, "error_msgs", ()) or ()),
        }
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            raise ValueError(f"converting the checkpoint tensors of '{prefix or 'the rest'}' failed: {problems}")
        return unit

    # ------------------------------------------------------------------------ quantized weights, read as stored

    @property
    def quantized(self) -> dict[str, list[str]]:
        """Model tensor -> its checkpoint keys, for the tensors fed by weights with a `.scale` (FP8 / FP4)."""
        if not hasattr(self, "_quantized"):
            keys: dict[str, list[str]] = defaultdict(list)
            for key, target in self.targets.items():
                keys[target].append(key)
            self._quantized = {
                t: sorted(k, key=_natural) for t, k in keys.items() if any(x.endswith(".scale") for x in k)
            }
        return self._quantized

    def _targets_of(self, prefix: str) -> set[str]:
        return {self.targets[key] for key in self.groups[prefix]}

    def _quantized_parts(self, prefix: str) -> dict[str, tuple[str, bool]]:
        """{part name: (model tensor, is the scale)} of the unit's quantized tensors: `<tensor>_q`, `<tensor>_scale`."""
        parts = {}
        for target in sorted(self._targets_of(prefix) & set(self.quantized)):
            codes, scales = quantized_parts(target)
            parts[codes], parts[scales] = (target, False), (target, True)
        return parts

    def _families(self, target: str, scale: bool) -> list[list[str]]:
        """The checkpoint keys of `target`'s codes (or scales): one list per family, in the order transformers
        concatenates them (`w1` before `w3`: gate, then up), each in expert order; a 1:1 weight is one family of one."""
        keys = [k for k in self.quantized[target] if k.endswith(".scale") == scale]
        families: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            families[_family(key)].append(key)
        return [sorted(families[name], key=_natural) for name in sorted(families)]

    def _read_raw(self, target: str, scale: bool, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`target`'s codes (or scale) as stored, as uint8 bytes, rows [start, stop) of dim 0 or all: one checkpoint
        tensor's rows, or for routed experts (one tensor per expert) those experts, gate and up concatenated."""
        families = self._families(target, scale)
        if len(self._shapes[target]) == 3:  # routed experts: [experts, rows of each family, columns]
            count = {len(f) for f in families}
            if len(count) != 1:
                raise ValueError(f"'{target}': families of different lengths {[len(f) for f in families]}")
            start, stop = rows or (0, count.pop())
            if stop <= start:
                shapes = [self._slice(f[0]).get_shape() for f in families]
                return torch.empty((0, sum(s[0] for s in shapes), shapes[0][1]), dtype=torch.uint8)
            experts = [
                torch.cat([self._slice(f[e])[:].view(torch.uint8) for f in families]) for e in range(start, stop)
            ]
            return torch.stack(experts)
        if len(families) != 1 or len(families[0]) != 1:
            raise ValueError(
                f"'{target}' is fed by {sum(map(len, families))} tensors; expected one weight and its scale"
            )
        source = self._slice(families[0][0])
        start, stop = rows or (0, source.get_shape()[0])
        return source[start:stop].contiguous().view(torch.uint8)

    def quantized_plan(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """{model tensor: (kind "fp8" | "fp4", shape of its codes' bytes, shape of its scale bytes)} for every
        quantized weight of the checkpoint, as `read` returns them under `keep_quantized` (`<tensor>_q`,
        `<tensor>_scale`); what `hf_dsv4.sharding.quantize_base` builds the model from."""
        plan = {}
        for target in self.quantized:
            shapes = []
            for scale in (False, True):
                families = self._families(target, scale)
                first = [self._slice(f[0]).get_shape() for f in families]
                rows = sum(s[0] for s in first)
                shapes.append(
                    (len(families[0]), rows, first[0][1]) if len(self._shapes[target]) == 3 else tuple(first[0])
                )
            dtype = self._slice(self._families(target, False)[0][0]).get_dtype()
            plan[target] = ("fp4" if dtype == "I8" else "fp8", *shapes)
        return plan

    def readable(self) -> set[str]:
        """The names `read` can return: the twin's state dict (with `keep_quantized`: a quantized weight's parts
        instead of the weight)."""
        names = set(self.twin.state_dict(keep_vars=True))
        if self.keep_quantized:
            names = (names - set(self.quantized)) | {part for t in self.quantized for part in quantized_parts(t)}
        return names

    def _collect(self, prefix: str, plan: _RowPlan) -> dict[str, torch.Tensor]:
        state = self.twin.state_dict()
        unit = {}
        for key, tensor in state.items():
            if not in_unit(key, prefix, self.prefixes):
                continue
            if plan.only is not None and key not in plan.only:
                continue
            if key in plan.empty:
                unit[key[len(prefix) :]] = torch.empty((0, *tensor.shape[1:]), dtype=tensor.dtype)
            elif not tensor.is_meta:
                if key in plan.cuts:  # rows read whole for their scale blocks: keep the asked ones only
                    offset, length = plan.cuts[key]
                    tensor = tensor[offset : offset + length].clone()
                unit[key[len(prefix) :]] = tensor
        return unit

    def _row_plan(self, prefix: str, rows: dict[str, tuple[int, int]], only: set[str] | None = None) -> _RowPlan:
        """What to read for unit `prefix` when only `rows` of some tensors are wanted. Per model tensor:
        - one checkpoint tensor per row (routed experts, fused by transformers from one tensor per expert): only the
          experts in the rows are read, each whole with its FP4 scale;
        - one checkpoint tensor with the same rows (a renamed or dequantized weight): its rows, widened to whole
          scale blocks for an FP8 weight (128 rows share a scale), read and converted, then cut to the rows asked;
        - anything else (or no rows asked): read whole, then cut."""
        plan = _RowPlan(only)
        by_target: dict[str, list[str]] = defaultdict(list)
        for key in self.groups[prefix]:
            if only is None or self.targets[key] in only:
                by_target[self.targets[key]].append(key)
        for target, keys in by_target.items():
            shape = self._shapes[target]
            start, stop = rows.get(target, (0, shape[0] if len(shape) else 0))
            if target not in rows or (start, stop) == (0, shape[0]):
                plan.tensors.update({key: self._slice(key) for key in keys})
                continue
            if stop <= start:
                plan.empty.add(target)
                continue
            shapes = {key: self._slice(key).get_shape() for key in keys}
            if all(len(s) == len(shape) - 1 for s in shapes.values()):  # one checkpoint tensor per row
                families: dict[str, list[str]] = defaultdict(list)
                for key in keys:
                    families[_family(key)].append(key)  # one list per w1 / w3 / scale
                for family, members in families.items():
                    if len(members) != shape[0]:
                        raise ValueError(f"'{target}' has {shape[0]} rows but {len(members)} tensors '{family}'")
                    members.sort(key=_natural)
                    plan.tensors.update({key: self._slice(key) for key in members[start:stop]})
                plan.shapes[target] = (stop - start, *shape[1:])
                continue
            weights = [key for key in keys if not key.endswith(".scale")]
            scale = weights[0][: -len("weight")] + "scale" if len(weights) == 1 else None
            if len(weights) != 1 or shapes[weights[0]][0] != shape[0] or (scale in shapes) != (len(keys) == 2):
                plan.tensors.update({key: self._slice(key) for key in keys})  # read whole, cut after conversion
                plan.cuts[target] = (start, stop - start)
                continue
            block = shape[0] // shapes[scale][0] if scale in shapes else 1
            first, last = start // block * block, min(-(-stop // block) * block, shape[0])
            plan.tensors[weights[0]] = _Rows(self._slice(weights[0]), first, last)
            if scale in shapes:
                plan.tensors[scale] = _Rows(self._slice(scale), first // block, -(-last // block))
            plan.shapes[target] = (last - first, *shape[1:])
            if (first, last) != (start, stop):
                plan.cuts[target] = (start - first, stop - start)
        return plan

    def _slice(self, key: str) -> Any:
        return self._open(self.file_of[key]).get_slice(key)

    def _set_local_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """The twin's tensors `shapes` take those shapes (on meta) for a partial read to load into; `_release` gives
        them their own shapes back."""
        for name, shape in shapes.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = self.twin.get_submodule(owner_name) if owner_name else self.twin
            if leaf in owner._parameters:
                old = owner._parameters[leaf]
                meta = torch.empty(shape, dtype=old.dtype, device="meta")
                owner._parameters[leaf] = nn.Parameter(meta, requires_grad=old.requires_grad)
            else:
                owner._buffers[leaf] = torch.empty(shape, dtype=owner._buffers[leaf].dtype, device="meta")

    @torch.no_grad()
    def _release(self, prefix: str) -> None:
        """The twin's unit back on meta (its tensors live on in what `read` returned, until the caller drops them)."""
        module = self.twin.get_submodule(prefix.rstrip(".")) if prefix else self.twin
        persistent = set(module.state_dict(keep_vars=True))
        for name, tensor in list(module.named_parameters()) + [
            (n, b) for n, b in module.named_buffers() if n in persistent
        ]:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            meta = torch.empty(self._shapes[f"{prefix}{name}"], dtype=tensor.dtype, device="meta")
            if isinstance(tensor, nn.Parameter):
                owner._parameters[leaf] = nn.Parameter(meta, requires_grad=tensor.requires_grad)
            else:
                owner._buffers[leaf] = meta

    def non_persistent_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers no checkpoint holds (rotary `*_inv_freq`), as stock `from_pretrained` computed them."""
        return non_persistent_buffers(self.twin)

    def close(self) -> None:
        self._handles.clear()


class _RowPlan:
    """What a partial read loads: checkpoint `tensors` (slices, or `_Rows` of them), the twin tensors that take a
    local `shapes`, the `cuts` (offset, length) made after conversion, the tensors with no rows (`empty`), and the
    unit's tensors asked for (`only`; None: all)."""

    def __init__(self, only: set[str] | None = None):
        self.only = only
        self.tensors: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.cuts: dict[str, tuple[int, int]] = {}
        self.empty: set[str] = set()


class _Rows:
    """Rows [start, stop) of a safetensors slice, seen by transformers' loader as a whole tensor (shape, dtype,
    `[...]` reads them)."""

    def __init__(self, source: Any, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def get_shape(self) -> list[int]:
        return [self.stop - self.start, *self.source.get_shape()[1:]]

    def get_dtype(self) -> str:
        return self.source.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        if index is not Ellipsis:
            raise TypeError(f"only [...] reads rows of a checkpoint tensor, not {index!r}")
        return self.source[self.start : self.stop]


def _family(key: str) -> str:
    """The key with its numbers starred: the tensors one per expert of one weight (or scale) share it."""
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1*", key)


def _natural(key: str) -> list:
    """Sort key: numbers by value (expert 10 after expert 9), as transformers orders the tensors it fuses."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def dequantizing_config(quantization_config: Any) -> Any:
    """The `quantization_config` that makes `from_pretrained` dequantize a checkpoint's FP8 / FP4 weights on load
    (what it does by itself on a machine without a GPU of compute capability >= 8.9, where it would otherwise build
    FP8 modules): DeepSeek-V4's release checkpoints (`quant_method: fp8`, FP4 routed experts)."""
    from transformers import FineGrainedFP8Config

    method = (
        quantization_config.get("quant_method")
        if isinstance(quantization_config, dict)
        else getattr(quantization_config, "quant_method", None)
    )
    if str(getattr(method, "value", method)) != "fp8":
        raise ValueError(f"streamed loading dequantizes fp8 checkpoints; this one is quantized with {method}")
    return FineGrainedFP8Config(dequantize=True)


def fp8_block_size(quantization_config: Any) -> tuple[int, int]:
    """The FP8 weights' scale block (`weight_block_size`, 128 x 128 for DeepSeek-V4)."""
    if isinstance(quantization_config, dict):
        block = quantization_config.get("weight_block_size")
    else:
        block = getattr(quantization_config, "weight_block_size", None)
    return tuple(block) if block else (128, 128)


def without_hub_kernels(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` keywords with the Hub kernels off. transformers 5.25 turns them on by default and
    `kernelize`s the loaded model: it refuses a model on meta (every rank of a streamed load, the twin a reader plans
    with), and only rank 0 would get the kernelized modules while the others build theirs from the config. FSDP2,
    the sparse attention and the quantized base replace forwards themselves; a user's `use_kernels=True` is refused."""
    if kwargs.get("use_kernels"):
        raise ValueError(
            "use_kernels=True cannot be honoured under memory_efficient_init: the model is built on meta (kernelize "
            "needs real weights) and every rank must build the same modules; load without it"
        )
    return {**kwargs, "use_kernels": False}


def open_streamed(
    cls: type,
    original_from_pretrained: Any,
    path: Any,
    args: tuple,
    kwargs: dict,
    fp8_block: tuple[int, int] | None = None,
) -> StreamedCheckpoint:
    """Run stock `from_pretrained` without reading weights (rank 0) and keep what it planned."""
    capture: dict[str, Any] = {}
    with compat.weights_not_read(capture):
        twin = original_from_pretrained.__get__(None, cls)(path, *args, **without_hub_kernels(kwargs))
    if "load_config" not in capture:
        raise ValueError(f"from_pretrained({path!r}) read no checkpoint files; streamed loading needs a checkpoint")
    return StreamedCheckpoint(twin, capture["checkpoint_files"], capture["load_config"], fp8_block)


@dataclass
class StreamSource:
    """What `from_pretrained` under `memory_efficient_init(stream=True)` hands to `shard_model` (its `stream`
    argument): how the checkpoint is read into the shards and, on the ranks that read it, the reader. Every rank of a
    streamed load has one (`stream_source(model)`); `shard_model` checks that the ranks agree on it.

    Args:
        readers: "rank0" (rank 0 reads each unit and sends it) or "all" (every rank reads its own rows).
        read_budget: bytes per piece read (None: whole units); see `shard_model`.
        keep_quantized: the weights stored as FP8 / FP4 stay so in the shards (`hf_dsv4.sharding.quantize_base`).
        quantized_experts: with `keep_quantized`, how routed experts compute ("per_expert" or "stack").
        checkpoint: this rank's reader of the checkpoint; None on the ranks that do not read (`readers="rank0"`).
    """

    readers: str = "rank0"
    read_budget: int | None = None
    keep_quantized: bool = False
    quantized_experts: str = "per_expert"
    checkpoint: StreamedCheckpoint | None = None


# The source of each model built under `memory_efficient_init(stream=True)`, until `shard_model` has filled it:
# `from_pretrained` must return the model alone, so the source is registered beside it (weakly: a model dropped
# unsharded takes its reader with it) instead of being left on it.
_SOURCES: weakref.WeakKeyDictionary[nn.Module, StreamSource] = weakref.WeakKeyDictionary()


def register_stream_source(model: nn.Module, source: StreamSource) -> None:
    """Record `source` as the way to fill `model` (what `from_pretrained` does under a streamed load)."""
    _SOURCES[model] = source


def stream_source(model: nn.Module) -> StreamSource | None:
    """The `StreamSource` registered for `model` (or for the transformers model inside a wrapper such as a
    PeftModel) by `from_pretrained` under `memory_efficient_init(stream=True)`; None for a model that was not loaded
    so, or whose shards are filled already.

    Args:
        model: a transformers model, or a module that holds one.

    Returns:
        The source, or None.
    """
    return next((_SOURCES[m] for m in pretrained_models(model) if m in _SOURCES), None)


def release_stream(model: nn.Module, source: StreamSource) -> None:
    """Drop `source` once `model`'s shards are filled: unregistered, and on a reading rank the reader, its twin and
    open files closed."""
    for pretrained in pretrained_models(model):
        if _SOURCES.get(pretrained) is source:
            del _SOURCES[pretrained]
        if source.checkpoint is not None:
            # the conversions the reads used, for save_pretrained to revert, as on a model from_pretrained loaded
            compat.set_weight_conversions(pretrained, compat.weight_conversions(source.checkpoint.twin))
    if source.checkpoint is not None:
        source.checkpoint.close()
