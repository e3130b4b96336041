"""A quantized-resident frozen base: DeepSeek-V4's release encodings kept as loaded, dequantized where they are used.

`memory_efficient_init(stream=True, keep_quantized=True)` + `shard_model` keep every weight the release checkpoint
quantizes as it is stored: FP8 e4m3 codes with ue8m0 128x128 block scales (attention, shared-expert and indexer
projections), FP4 e2m1 codes packed two per byte with ue8m0 1x32 scales (routed experts). `quantize_base` turns the
meta model into that shape before `fully_shard`: each quantized weight becomes a frozen `QuantizedWeight` parameter,
a tensor subclass (torchao's `NF4Tensor` pattern) of the weight's shape and dtype that holds the uint8 codes and
scale bytes and

- dequantizes where an op uses it (`__torch_dispatch__`: the matmul, linear, bmm or grouped mm gets the weight in
  the model's dtype, the same bits as transformers' arithmetic, `dequantize`) and keeps view ops (transpose, an
  expert of a stack) lazy, so autograd saves the subclass (bytes), never a dequantized weight, also inside
  activation checkpointing: the weight is made again where backward uses it; each module's own forward
  (nn.Linear, DeepSeek-V4's grouped projection, the routed experts) runs unchanged;
- routed experts compute per expert (transformers' eager loop: `stack[e]` holds expert e's bytes, dequantized when
  the loop uses it, one expert's weight at a time) or as one stack (`experts="stack"`: the model's experts
  implementation);
- tells FSDP2 what to all-gather (`fsdp_pre_all_gather` / `fsdp_post_all_gather`): the codes (and FP4's row scales),
  sharded along dim 0 with the rows they encode; FP8's 128-row block scales are small (1/16384 of the codes) and
  every shard keeps them whole. So FSDP2 shards and all-gathers bytes, never bf16, in the groups of the dequantized
  model;
- keeps the checkpoint's names in the state dict (`<leaf>_q`: the codes, `<leaf>_scale`: the scales, module state-dict
  hooks), which the loaders fill;
- refuses in-place changes (`QuantizationError`): peft's merge would add the update to a dequantized copy and lose
  it. peft's LoRA wraps these modules as it wraps plain ones; a routed-expert adapter (`target_parameters`) is peft's
  own `ParamWrapper`, whose `baddbmm(W, lhs, rhs, alpha=scaling)` fold stays lazy: per expert, the loop's `stack[e]`
  folds that expert's factors (`_Fold`, the arithmetic of peft's fold for that expert).

What torchao does not cover, and why it is not used as is: its NF4 / float8 tensors encode their own formats (no
ue8m0 block scales, no FP4 e2m1 pairs with transformers' decode), dequantize whole tensors (no per-expert views of
a stack, no lazy LoRA fold) and are not installed here; the pattern (a wrapper subclass with FSDP2's all-gather
extension) is what is taken.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import compat
from ..formats import DATA, EXPERTS_MODES, KINDS, SCALE

aten = torch.ops.aten

# plan entry: model tensor name -> (kind, shape of the codes' bytes, shape of the scale bytes)
QuantizedPlan = dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]


class QuantizationError(RuntimeError):
    """A model cannot keep its base quantized as asked."""


def dequantize(data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight that the uint8 `data` (FP8 e4m3 codes, or FP4 e2m1 codes two per byte, low nibble first) and `scale`
    (ue8m0 bytes: 2^(s-127) per 128 x 128 block for FP8, per 1 x 32 for FP4) encode, in `dtype`; a leading experts
    dimension is kept (dequantized expert by expert). Every value is a code times a power of two, so the result is the
    exact product rounded once to `dtype`: the same bits as transformers' `Fp8Dequantize` arithmetic
    (`dequantize_reference`, what a dequantizing `from_pretrained` applies; tested equal for every byte), computed
    here in `dtype` directly (no float32 copies) with a 256-entry table for FP4's byte pairs.

    Args:
        data: uint8 codes `[out, in]` (FP8) or `[out, in / 2]` (FP4), with an optional leading experts dimension.
        scale: uint8 ue8m0 exponents of the blocks, with the same leading dimension.
        kind: "fp8" or "fp4".
        dtype: the result's dtype.

    Returns:
        The weight `[..., out, in]` in `dtype` (on meta for meta codes).

    Raises:
        ValueError: an unknown `kind`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}: expected one of {KINDS}")
    width = data.shape[-1] * (2 if kind == "fp4" else 1)
    if data.is_meta:
        return torch.empty((*data.shape[:-1], width), dtype=dtype, device="meta")
    if data.dim() == 2:
        return _dequantize_matrix(data, scale, kind, dtype)
    out = torch.empty((*data.shape[:-1], width), dtype=dtype, device=data.device)
    for expert in range(data.shape[0]):
        out[expert] = _dequantize_matrix(data[expert], scale[expert], kind, dtype)
    return out


def _dequantize_matrix(data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    factors = scale.view(torch.float8_e8m0fnu).to(dtype)  # 2^(s-127), exact in bf16 and fp32
    if kind == "fp8":
        rows, cols = data.shape
        grid_rows, grid_cols = factors.shape
        codes = data.view(torch.float8_e4m3fn).to(dtype)  # e4m3 is exact in bf16 and fp32
        blocks = codes.view(grid_rows, rows // grid_rows, grid_cols, cols // grid_cols)
        return (blocks * factors[:, None, :, None]).view(rows, cols)
    rows, half = data.shape
    values = _fp4_pairs(dtype, data.device).index_select(0, data.reshape(-1).int()).view(rows, factors.shape[1], -1)
    return (values * factors[:, :, None]).view(rows, 2 * half)


_PAIRS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _fp4_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """byte -> (e2m1 value of its low nibble, of its high nibble), in `dtype`: transformers' e2m1 table (code 8 is
    -0.0, as it decodes it)."""
    key = (dtype, torch.device(device))
    if key not in _PAIRS:
        table = torch.tensor(
            [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=dtype
        )
        byte = torch.arange(256)
        _PAIRS[key] = torch.stack([table[byte & 15], table[byte >> 4]], dim=-1).to(device)
    return _PAIRS[key]


def dequantize_reference(data: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` by transformers' own arithmetic (`compat.dequantize_blocks`: float32, then cast): the reference
    `dequantize` is tested against."""
    codes = data.view(torch.float8_e4m3fn if kind == "fp8" else torch.int8)
    return compat.dequantize_blocks(codes, scale.view(torch.float8_e8m0fnu), dtype)


# ------------------------------------------------------------------------------------------- the weight


def _map(fn: Callable[[Any], Any], value: Any) -> Any:
    """`fn` on every tensor in the (nested lists / tuples / dicts of) arguments of an op."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    return fn(value)


# view ops kept lazy: what autograd saves of a weight's view stays the subclass
_VIEWS = frozenset(
    {
        aten.t.default,
        aten.transpose.int,
        aten.select.int,
        aten.unsqueeze.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.expand.default,
        aten.permute.default,
        aten.slice.Tensor,
        aten.as_strided.default,
    }
)


class QuantizedWeight(torch.Tensor):
    """A frozen weight of `shape` and `dtype` held as uint8 `codes` and `scale` bytes (`kind` "fp8" or "fp4"; see the
    module docstring). `views`: view ops applied to the dequantized weight; `update`: a routed-expert LoRA fold
    (`_Fold`); `per_expert`: a stack whose LoRA fold is made expert by expert; `owner`: the module whose
    `recompute_in_backward` it follows. `rows`: the whole weight's rows (dim 0); `row_scales`: whether the scales
    have one row per row of the weight (FP4's 1 x 32 blocks, an expert stack), else they are FP8's 128-row blocks,
    kept whole by every shard."""

    @staticmethod
    def __new__(cls, codes, scale, kind, shape, dtype, rows=None, row_scales=None, **lazy):
        meta = torch.empty(shape, dtype=dtype, device="meta")
        for op, args in lazy.get("views", ()):
            meta = op(meta, *args)
        return compat.make_wrapper_subclass(cls, meta, codes.device)

    def __init__(self, codes, scale, kind, shape, dtype, rows=None, row_scales=None, views=(), update=None,
                 per_expert=False, owner=None):  # fmt: skip
        self.codes, self.scale, self.kind, self.logical = codes, scale, kind, tuple(shape)
        self.rows = shape[0] if rows is None else rows
        self.row_scales = scale.shape[0] == shape[0] if row_scales is None else row_scales
        self.views, self.update, self.per_expert, self.owner = tuple(views), update, per_expert, owner

    def _with(self, **changes: Any) -> QuantizedWeight:
        fields = {"codes": self.codes, "scale": self.scale, "kind": self.kind, "shape": self.logical,
                  "dtype": self.dtype, "rows": self.rows, "row_scales": self.row_scales, "views": self.views,
                  "update": self.update, "per_expert": self.per_expert, "owner": self.owner}  # fmt: skip
        fields.update(changes)
        return QuantizedWeight(**fields)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"QuantizedWeight({self.kind}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        meta = (self.kind, self.logical, self.dtype, self.rows, self.row_scales, self.views, self.update)
        return ["codes", "scale"], (*meta, self.per_expert)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        kind, shape, dtype, rows, row_scales, views, update, per_expert = meta
        return QuantizedWeight(inner["codes"], inner["scale"], kind, shape, dtype, rows, row_scales, views=views,
                               update=update, per_expert=per_expert)  # fmt: skip

    def dequantized(self) -> torch.Tensor:
        """The weight (or its view) in its dtype, made from the bytes now."""
        if self.update is not None and self.update[0] == "pending":
            raise QuantizationError("a routed-expert stack folded expert by expert is used one expert at a time")
        if not self.row_scales and self.logical[0] != self.rows:
            raise QuantizationError("a shard of a quantized weight is dequantized whole: all-gather it first")
        weight = dequantize(self.codes, self.scale, self.kind, self.dtype)
        if self.update is not None:
            weight = _apply_update(weight, self.update)
        for op, args in self.views:
            weight = op(weight, *args)
        return weight

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0] if args and isinstance(args[0], QuantizedWeight) else None
        if weight is not None and func is torch.baddbmm and not weight.views and weight.update is None:
            lhs, rhs, alpha = args[1], args[2], kwargs.get("alpha", 1)
            if kwargs.get("beta", 1) == 1 and len(args) == 3:
                if weight.per_expert:  # folded expert by expert, when the loop takes one (below)
                    return weight._with(update=("pending", lhs, rhs, alpha))
                return _Fold.apply(weight, lhs, rhs, alpha, False)
        if weight is not None and func is torch.Tensor.__getitem__ and weight.update and weight.update[0] == "pending":
            _, lhs, rhs, alpha = weight.update
            if not isinstance(args[1], int) and not (isinstance(args[1], torch.Tensor) and args[1].numel() == 1):
                raise QuantizationError("a routed-expert stack folded expert by expert is indexed by one expert")
            expert = int(args[1])
            one = weight._with(update=None)[expert]
            return _Fold.apply(one, lhs[expert : expert + 1], rhs[expert : expert + 1], alpha, True)
        if func.__name__ != "__get__" and torch.is_grad_enabled() and any(map(_kept, (*args, *kwargs.values()))):
            # the module keeps its dequantized weights for backward (`recompute_in_backward` off)
            dense = lambda t: t.dequantized() if _kept(t) else t  # noqa: E731
            args, kwargs = _map(dense, args), _map(dense, kwargs)
        with compat.subclass_functions_disabled():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bytewise = _BYTES.get(func)
        if bytewise is not None:
            out = bytewise(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if compat.writes_into_arguments(func):
            raise QuantizationError(_IN_PLACE)
        if func in _VIEWS and isinstance(args[0], QuantizedWeight):
            weight, view = args[0], (func, tuple(args[1:]))
            seen = func(torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device="meta"), *view[1])
            if seen.shape == weight.shape and seen.stride() == weight.stride():  # e.g. DTensor's `view_as(itself)`
                return weight._with()
            return weight._with(views=(*weight.views, view))
        dense = lambda t: t.dequantized() if isinstance(t, QuantizedWeight) else t  # noqa: E731
        return func(*_map(dense, args), **_map(dense, kwargs))

    # FSDP2's all-gather extension: the bytes travel, the weight is made where it is used

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        rows, shards = outer_size[0], mesh.size()
        if rows % shards == 0:  # the codes (and row scales) as they are
            return ((self.codes, self.scale) if self.row_scales else (self.codes,)), (None, self.scale)
        # unevenly sharded: FSDP2 wants one input of the padded shard's shape, so the bytes are laid into it (FP8's
        # codes have that shape; FP4's codes and row scales take 17/32 of it)
        padded = torch.zeros((-(-rows // shards), *self.logical[1:]), dtype=torch.uint8, device=self.codes.device)
        flat, n = padded.view(padded.shape[0], -1), self.codes.shape[0]
        width, scales = math.prod(self.codes.shape[1:]), math.prod(self.scale.shape[1:])
        flat[:n, :width] = self.codes.reshape(n, width)
        if self.row_scales:
            flat[:n, width : width + scales] = self.scale.reshape(n, scales)
        return (padded,), (rows, self.scale)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        rows, own_scale = metadata
        if rows is None:  # evenly sharded: the gathered buffers are the weight's
            codes, scale = outputs if self.row_scales else (outputs[0], own_scale)
            if out is not None:  # the same buffers, gathered again
                return None
            gathered = self._with(codes=codes, scale=scale, shape=(codes.shape[0], *self.logical[1:]), views=())
            return gathered, tuple(outputs)
        flat = outputs[0].view(outputs[0].shape[0], -1)[:rows]
        width, scales = math.prod(self.codes.shape[1:]), math.prod(self.scale.shape[1:])
        if not self.row_scales:  # FP8: the leading rows are the codes
            codes, scale, inner = flat.view(rows, *self.codes.shape[1:]), own_scale, tuple(outputs)
        else:  # taken out of the padded rows into buffers of their own, which FSDP2 frees and refills as the rest
            codes = out.codes if out is not None else self.codes.new_empty((rows, *self.codes.shape[1:]))
            scale = out.scale if out is not None else self.scale.new_empty((rows, *self.scale.shape[1:]))
            codes.view(rows, width).copy_(flat[:, :width])
            scale.view(rows, scales).copy_(flat[:, width : width + scales])
            inner = (*outputs, codes, scale)
        if out is not None:
            return None
        return self._with(codes=codes, scale=scale, shape=(rows, *self.logical[1:]), views=()), inner


def _kept(value: Any) -> bool:
    owner = value.owner() if isinstance(value, QuantizedWeight) and value.owner is not None else None
    return owner is not None and not getattr(owner, "recompute_in_backward", True)


_IN_PLACE = (
    "a LoRA adapter cannot be merged into a quantized-resident base (its weights are computed from FP8 / FP4 "
    "bytes, and re-quantizing would round the update away): save the adapter and merge it into the checkpoint "
    "with hf_dsv4.merge_adapter (python -m hf_dsv4.merge), which writes a bf16 model"
)


def _apply_update(weight: torch.Tensor, update: tuple) -> torch.Tensor:
    """A routed-expert LoRA fold on the dequantized stack (or on one expert of it), as peft folds it into a bf16
    stack: `baddbmm(W, lhs, rhs, alpha=scaling)` (peft's `_LoraFactorsProxy`)."""
    _, lhs, rhs, alpha, one = update
    with torch.autocast(device_type=weight.device.type, enabled=False):
        folded = torch.baddbmm(weight[None] if one else weight, lhs, rhs, alpha=alpha)
    return folded[0] if one else folded


class _Fold(torch.autograd.Function):
    """peft's fold `baddbmm(W, lhs, rhs, alpha)` of a frozen quantized `W` (a stack, or with `one` an expert and its
    factors' slices, then taken `[0]`), made where the folded weight is used; backward is autograd's for those
    ops (`SelectBackward`, then `BaddbmmBackward`'s formulas), so the factors' gradients are the same numbers."""

    @staticmethod
    def forward(ctx, weight, lhs, rhs, alpha, one):
        ctx.save_for_backward(lhs, rhs)
        ctx.alpha, ctx.one, ctx.shape = alpha, one, weight.shape
        return weight._with(update=("factors", lhs.detach(), rhs.detach(), alpha, one))

    @staticmethod
    def backward(ctx, grad):
        lhs, rhs = ctx.saved_tensors
        if ctx.one:
            whole = grad.new_zeros((1, *ctx.shape))
            whole.select(0, 0).copy_(grad)
            grad = whole
        grad_lhs = grad_rhs = None
        if ctx.needs_input_grad[1]:
            grad_lhs = grad.bmm(rhs.transpose(1, 2).conj())
            grad_lhs = grad_lhs * ctx.alpha if ctx.alpha != 1 else grad_lhs
        if ctx.needs_input_grad[2]:
            grad_rhs = lhs.transpose(1, 2).conj().bmm(grad)
            grad_rhs = grad_rhs * ctx.alpha if ctx.alpha != 1 else grad_rhs
        return None, grad_lhs, grad_rhs, None, None


# ops on the bytes themselves (FSDP2's sharding and padding, moves, copies, one expert of a stack): rows of dim 0
# are rows of the codes, and of the scales where they have one per row (FP4; experts), else the scales stay whole


def _rows(weight: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    scale = weight.scale[start:stop] if weight.row_scales else weight.scale
    return weight._with(codes=weight.codes[start:stop], scale=scale, shape=(stop - start, *weight.logical[1:]))


def _plain(weight: Any) -> bool:
    return isinstance(weight, QuantizedWeight) and not weight.views and weight.update is None


def _split(weight, size, dim=0):
    if not _plain(weight) or dim != 0:
        return NotImplemented
    rows = weight.logical[0]
    return [_rows(weight, start, min(start + size, rows)) for start in range(0, rows, size)]


def _slice(weight, dim=0, start=None, end=None, step=1):
    if not _plain(weight) or dim != 0 or step != 1:
        return NotImplemented
    rows = weight.logical[0]
    start, end = max(0, start or 0), min(rows if end is None else end, rows)
    return _rows(weight, start, max(start, end))


def _select(weight, dim, index):
    if not _plain(weight) or dim != 0 or len(weight.logical) != 3:
        return NotImplemented
    index = index + weight.logical[0] if index < 0 else index
    codes, scale = weight.codes[index], weight.scale[index]
    return weight._with(codes=codes, scale=scale, shape=weight.logical[1:], rows=None, row_scales=None)


def _new(make: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """`new_zeros` / `new_empty` of a weight's rows: its codes' and scales' rows."""

    def op(weight, size, **kwargs):
        if not _plain(weight) or tuple(size[1:]) != weight.logical[1:]:
            return NotImplemented
        scale = (size[0], *weight.scale.shape[1:]) if weight.row_scales else weight.scale.shape
        codes = make(weight.codes, (size[0], *weight.codes.shape[1:]))
        return weight._with(codes=codes, scale=make(weight.scale, scale), shape=tuple(size))

    return op


def _like(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def op(weight, *args, **kwargs):
        if not _plain(weight) or args or kwargs.get("dtype") not in (None, weight.dtype):
            return NotImplemented
        device = kwargs.get("device")
        return weight._with(codes=make(weight.codes, device), scale=make(weight.scale, device))

    return op


def _to_copy(weight, **kwargs):
    if not _plain(weight):
        return NotImplemented
    device = kwargs.get("device") or weight.device
    dtype = kwargs.get("dtype") or weight.dtype  # the weight is made in another dtype: the same bytes
    return weight._with(codes=weight.codes.to(device), scale=weight.scale.to(device), dtype=dtype)


def _as_strided(weight, size, stride, storage_offset=0):
    if _plain(weight) and tuple(size) == tuple(weight.shape) and tuple(stride) == weight.stride():
        return weight._with()
    return NotImplemented


def _copy(target, source, non_blocking=False):
    if not (_plain(target) and _plain(source)):
        return NotImplemented
    target.codes.copy_(source.codes)
    target.scale.copy_(source.scale)
    return target


def _set_itself(target, source=None, *args):
    return target if source is target else NotImplemented  # peft's parametrization sets the original to itself


_BYTES = {
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.new_zeros.default: _new(lambda t, size: t.new_zeros(size)),
    aten.new_empty.default: _new(lambda t, size: t.new_empty(size)),
    aten.empty_like.default: _like(lambda t, device: torch.empty_like(t, device=device)),
    aten.zeros_like.default: _like(lambda t, device: torch.zeros_like(t, device=device)),
    aten.clone.default: _like(lambda t, device: t.clone()),
    aten._to_copy.default: _to_copy,
    aten.as_strided.default: _as_strided,
    aten.copy_.default: _copy,
    aten.set_.source_Tensor: _set_itself,
    aten.is_pinned.default: lambda weight, *args: weight.codes.is_pinned(),
    aten.detach.default: lambda weight: weight._with(),
    aten.alias.default: lambda weight: weight._with(),
}


# ----------------------------------------------------------------------------------------------- the model


def quantized_weights(module: nn.Module) -> dict[str, QuantizedWeight]:
    """`module`'s own quantized weights (sharded or not: FSDP2 holds them in DTensors), by leaf name."""
    params = module.named_parameters(recurse=False)
    return {leaf: param for leaf, param in params if isinstance(_local(param)[0], QuantizedWeight)}


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weights `quantize_base` keeps quantized.

    Args:
        model: the model, sharded or not.

    Returns:
        name -> module, in module order.
    """
    return {name: m for name, m in model.named_modules() if quantized_weights(m)}


def _local(param: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A parameter's local tensor and, for a DTensor, its (mesh, placements)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local(), (param.device_mesh, param.placements)
    return param, None


def _as_parts(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: a quantized weight `<leaf>` as the checkpoint's parts, `<leaf>_q` (the codes) and
    `<leaf>_scale` (the scales): the names the loaders fill (DTensors when FSDP2 shards it)."""
    from torch.distributed.tensor import DTensor, Replicate

    for leaf, param in quantized_weights(module).items():
        if prefix + leaf not in state_dict:
            continue
        del state_dict[prefix + leaf]
        weight, sharded = _local(param)
        for suffix, part in ((DATA, weight.codes), (SCALE, weight.scale)):
            if sharded is not None:
                mesh, placements = sharded
                whole = suffix == SCALE and not weight.row_scales
                shape = part.shape if whole else (param.shape[0], *part.shape[1:])
                placements = [Replicate()] * len(placements) if whole else placements
                part = DTensor.from_local(part, mesh, placements, run_check=False, shape=torch.Size(shape),
                                          stride=_contiguous(shape))  # fmt: skip
            state_dict[prefix + leaf + suffix] = nn.Parameter(part, requires_grad=False)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _from_parts(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict hook: `<leaf>_q` and `<leaf>_scale` (the checkpoint's parts, plain or DTensors) become the
    quantized weight `<leaf>`."""
    from torch.distributed.tensor import DTensor

    for leaf, param in quantized_weights(module).items():
        codes, scale = state_dict.get(prefix + leaf + DATA), state_dict.get(prefix + leaf + SCALE)
        if codes is None and scale is None:
            continue
        if codes is None or scale is None:
            raise QuantizationError(f"'{prefix}{leaf}' is loaded from both {DATA} and {SCALE}, not one of them")
        del state_dict[prefix + leaf + DATA], state_dict[prefix + leaf + SCALE]
        like, sharded = _local(param)
        codes_local, _ = _local(codes)
        scale_local, _ = _local(scale)
        weight = like._with(codes=codes_local.detach(), scale=scale_local.detach(),
                            shape=(codes_local.shape[0], *like.logical[1:]), owner=weakref.ref(module))  # fmt: skip
        if sharded is None and tuple(weight.shape) != tuple(param.shape):
            raise QuantizationError(f"'{prefix}{leaf}': {DATA} has {weight.shape[0]} rows, the weight {param.shape[0]}")
        if sharded is not None:
            mesh, placements = sharded
            weight = DTensor.from_local(weight, mesh, placements, run_check=False, shape=param.shape,
                                        stride=param.stride())  # fmt: skip
        state_dict[prefix + leaf] = weight


_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _owners(model: nn.Module, name_of: Callable[[str], str]) -> dict[str, tuple[nn.Module, str]]:
    """{name as the checkpoint reader knows it: (module owning the parameter, leaf name)} for `model`'s parameters."""
    owners = {}
    for name, module in model.named_modules():
        for leaf in module._parameters:
            owners[name_of(f"{name}.{leaf}" if name else leaf)] = (module, leaf)
    return owners


def quantize_base(
    model: nn.Module,
    plan: QuantizedPlan,
    name_of: Callable[[str], str] = lambda name: name,
    experts: str = "per_expert",
) -> int:
    """Give the quantized weights of `plan` ({name as the checkpoint reader knows it: (kind, bytes shape, scale shape)})
    their quantized form in `model` (on meta), in place; `name_of` maps a name of `model` to the reader's (a PEFT
    wrapper's names to the base model's). Idempotent. The base must be frozen: LoRA adapters train, nothing else.
    `experts`: how quantized routed experts compute. "per_expert" (default): transformers' eager experts loop, each
    expert's weight dequantized when its tokens reach it (a forward holds one expert's weight, not the layer's: what
    lets V4-Flash's 256-expert layers fit); the same arithmetic as the eager implementation over a dequantized base.
    "stack": the layer's experts dequantized into one stack and computed by the model's configured experts
    implementation (grouped_mm by default), exactly as over a dequantized base with that implementation, holding
    the layer's experts in the compute dtype during its forward (V4-Flash: 12.9 GB in bf16, twice that with a
    routed-expert adapter).

    Args:
        model: the model on meta (a PeftModel is fine), changed in place.
        plan: the weights to keep quantized.
        name_of: a name of `model` -> the reader's.
        experts: "per_expert" or "stack".

    Returns:
        The number of weights quantized by this call.

    Raises:
        ValueError: an unknown `experts`.
        QuantizationError: a planned weight the model lacks, holds real values, or is trainable; a trainable base
            parameter beside the adapters.
    """
    if experts not in EXPERTS_MODES:
        raise ValueError(f"experts must be one of {EXPERTS_MODES}, not {experts!r}")
    done, owners = 0, _owners(model, name_of)
    for target in sorted(plan):
        kind, data_shape, scale_shape = plan[target]
        if target not in owners:
            raise QuantizationError(f"the model has no parameter '{target}' to keep quantized")
        module, leaf = owners[target]
        weight = module._parameters[leaf]
        if isinstance(weight, QuantizedWeight):
            continue
        if not weight.is_meta:
            raise QuantizationError(f"'{target}' holds weights already: keep_quantized needs a model streamed on meta")
        if weight.requires_grad:
            raise QuantizationError(
                f"'{target}' is trainable, but keep_quantized keeps the base frozen and trains LoRA adapters only: "
                "full fine-tuning needs the dequantized weights (load without keep_quantized), or add a LoRA adapter"
            )
        per_expert = weight.dim() == 3 and experts == "per_expert"
        codes = torch.empty(tuple(data_shape), dtype=torch.uint8, device="meta")
        scale = torch.empty(tuple(scale_shape), dtype=torch.uint8, device="meta")
        quantized = QuantizedWeight(codes, scale, kind, tuple(weight.shape), weight.dtype, per_expert=per_expert,
                                    owner=weakref.ref(module))  # fmt: skip
        setattr(module, leaf, nn.Parameter(quantized, requires_grad=False))
        if module not in _HOOKED:  # the state dict in the checkpoint's parts
            _HOOKED.add(module)
            module.recompute_in_backward = True  # off: autograd keeps the dequantized weights (tests compare)
            module.register_state_dict_post_hook(_as_parts)
            module.register_load_state_dict_pre_hook(_from_parts)
        if per_expert:  # transformers' eager loop, whatever the model's experts implementation
            module.config = compat.eager_experts_config(module.config)
        done += 1
    _refuse_trainable_base(model)
    return done


def _refuse_trainable_base(model: nn.Module) -> None:
    """keep_quantized trains adapters only: any other trainable parameter (full fine-tuning, modules_to_save) fails."""
    if not quantized_modules(model):
        return
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name]
    if trainable:
        shown = ", ".join(trainable[:4]) + (" ..." if len(trainable) > 4 else "")
        raise QuantizationError(
            f"keep_quantized keeps the base frozen and trains LoRA adapters only, but {len(trainable)} other "
            f"parameter(s) are trainable ({shown}): full fine-tuning needs the dequantized weights (load without "
            "keep_quantized)"
        )
