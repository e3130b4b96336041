"""A quantized-resident frozen base: DeepSeek-V4's release encodings kept as loaded, dequantized per layer.

`memory_efficient_init(stream=True, keep_quantized=True)` + `shard_model` keep every weight the release checkpoint
quantizes as it is stored: FP8 e4m3 codes with ue8m0 128x128 block scales (attention, shared-expert and indexer
projections), FP4 e2m1 codes packed two per byte with ue8m0 1x32 scales (routed experts). `quantize_base` turns the
meta model into that shape before `fully_shard`:

- a quantized weight `<leaf>` becomes two frozen uint8 parameters, `<leaf>_q` (the codes' bytes) and `<leaf>_scale`
  (the scale bytes), and the module's class becomes a subclass of its own whose `<leaf>` is a property: the weight
  dequantized into the model's dtype, the same bits as transformers' arithmetic (the one a dequantizing
  `from_pretrained` uses; `dequantize`). The module's own forward (nn.Linear, DeepSeek-V4's grouped projection, the
  routed experts) runs unchanged on it; routed experts compute per expert (transformers' eager loop, each expert's
  weight made when the loop reaches it) or as one stack (`experts="stack"`: the model's experts implementation);
- FSDP2 shards and all-gathers the uint8 bytes (never bf16), in the group of the weight they stand for, so the groups
  are the dequantized model's (FSDP2 never casts non-floating parameters);
- within one forward of such a module each weight is dequantized once; what autograd saves of it (the weight or a
  view: the weight carries its recipe) is saved as the recipe instead (`saved_tensors_hooks`) and made again in
  backward, so no dequantized weight outlives its module's forward. Inside activation checkpointing (which
  recomputes whole layers) the same holds: the module's hooks hand everything else on to the checkpoint's hooks
  (`compat.saved_tensors_hooks_in_effect`), so the recomputed layer keeps no routed expert's weight for its
  backward (Flash: 256 experts' bf16 weights, 12.9 GB per layer, if it did);
- peft's LoRA wraps these modules as it wraps the plain ones: a `lora.Linear` calls the quantized Linear; a routed-
  expert adapter (`target_parameters`) is folded into the dequantized stack exactly as peft folds it into a bf16 one
  (`torch.baddbmm(W, lhs, rhs, alpha=scaling)`, `compat.QuantizedParamWrapper`), so the adapter is peft's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import compat
from ..formats import DATA, EXPERTS_MODES, KINDS, QUANTIZED, SCALE

_SCOPE = "_hf_dsv4_forward_scope"
_RECIPE = "_hf_dsv4_recipe"  # on a dequantized weight: how to make it again
LOGICAL_NUMEL = "_hf_dsv4_logical_numel"  # on a quantized weight's parameters, until sharded
_UPDATES = "_hf_dsv4_lora_updates"  # routed-expert LoRA updates active in this forward: {leaf: update}
PER_EXPERT = "_hf_dsv4_per_expert"  # on quantized routed experts computed expert by expert (`EXPERTS_MODES`)

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


# ------------------------------------------------------------------------------------- one forward of a module


class _Recipe:
    """How to make one dequantized weight again; the first `get` in backward makes it, later ones share it."""

    def __init__(self, make: Callable[[], torch.Tensor]):
        self.make, self.value = make, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.make()
        return self.value


class _Saved:
    """What autograd keeps instead of a view of a dequantized weight: its recipe and the view's geometry."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, tensor: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = (
            recipe,
            tensor.size(),
            tensor.stride(),
            tensor.storage_offset(),
        )

    def tensor(self) -> torch.Tensor:
        return self.recipe.get().as_strided(self.size, self.stride, self.offset)


class _ForwardScope:
    """One forward of a quantized module: the weights it dequantized (kept for the forward unless `keep=False`), each
    tagged with its recipe, so that what autograd saves of them (the weight or a view of it) is saved as the recipe."""

    def __init__(self, outer: tuple[Callable, Callable] | None = None):
        self.values: dict[str, torch.Tensor] = {}
        self.tagged = False
        self.outer = outer  # the saved-tensor hooks outside this forward (activation checkpointing's), if any

    def add(self, key: str, value: torch.Tensor, make: Callable[[], torch.Tensor], keep: bool = True) -> None:
        if keep:
            self.values[key] = value
        if value.device.type != "meta":
            recipe = _Recipe(make)
            for tensor in (value, value._base):  # a view's saved views have the view's base as their `_base`
                if tensor is not None:
                    setattr(tensor, _RECIPE, recipe)
            self.tagged = True

    def pack(self, tensor: torch.Tensor) -> Any:
        recipe = getattr(tensor, _RECIPE, None) if self.tagged else None
        if recipe is None and self.tagged and tensor._base is not None:
            recipe = getattr(tensor._base, _RECIPE, None)
        if recipe is not None:
            return _Saved(recipe, tensor)
        return tensor if self.outer is None else self.outer[0](tensor)

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, _Saved):
            return saved.tensor()
        return saved if self.outer is None else self.outer[1](saved)


class QuantizedModule:
    """Mixin of the classes `quantize_base` gives quantized modules (see the module docstring)."""

    recompute_in_backward = True  # per instance (off: autograd keeps the dequantized weights; tests compare)

    def _quantized_leaf(self, leaf: str, expert: int | None = None) -> Any:
        """The weight `leaf` dequantized (with the routed-expert LoRA update peft handed over, if any), made once per
        forward; with `expert`, that expert's weight only. In a forward of experts computed per expert, the stack is
        an `_Experts` view that makes each expert's weight when the loop indexes it."""
        scope = self.__dict__.get(_SCOPE)
        key = leaf if expert is None else f"{leaf}[{expert}]"
        if scope is not None and key in scope.values:
            return scope.values[key]
        kind, shape, dtype = self.__dict__[QUANTIZED][leaf]
        data, scale = self._parameters[leaf + DATA], self._parameters[leaf + SCALE]
        if expert is None and scope is not None and self.__dict__.get(PER_EXPERT) and len(shape) == 3:
            return _Experts(self, leaf)
        if data.is_meta:
            return torch.empty(shape if expert is None else shape[1:], dtype=dtype, device="meta")
        if hasattr(data, "full_tensor"):  # outside forward, FSDP2 holds shards: the whole weight (a collective)
            data, scale = data.full_tensor(), scale.full_tensor()
        if expert is not None:
            data, scale = data[expert], scale[expert]
        update = self.__dict__.get(_UPDATES, {}).get(leaf)

        def make() -> torch.Tensor:
            weight = dequantize(data, scale, kind, dtype)
            return weight if update is None else _apply_update(weight, update, expert)

        value = make()
        if scope is not None:  # one expert's weight is used once by the loop: not kept beyond that
            scope.add(key, value, lambda: make().detach(), keep=expert is None)
        return value

    @contextlib.contextmanager
    def _forward_scope(self) -> Iterator[None]:
        if _SCOPE in self.__dict__:  # re-entered (a forward calling itself): one scope
            yield
            return
        scope = _ForwardScope(compat.saved_tensors_hooks_in_effect())
        self.__dict__[_SCOPE] = scope
        try:
            if self.recompute_in_backward and torch.is_grad_enabled():
                with torch.autograd.graph.saved_tensors_hooks(scope.pack, scope.unpack):
                    yield
            else:
                yield
        finally:
            del self.__dict__[_SCOPE]


def _apply_update(weight: torch.Tensor, update: tuple, expert: int | None = None) -> torch.Tensor:
    """A routed-expert LoRA update on the dequantized stack (or on one `expert` of it), as peft applies it to a bf16
    stack: `baddbmm(W, lhs, rhs, alpha=scaling)` (peft's `_LoraFactorsProxy`), else `W + delta`."""
    if update[0] == "factors":
        _, lhs, rhs, scaling = update
        one = slice(None) if expert is None else slice(expert, expert + 1)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            folded = torch.baddbmm(weight if expert is None else weight[None], lhs[one], rhs[one], alpha=scaling)
        return folded if expert is None else folded[0]
    return weight + (update[1] if expert is None else update[1][expert])


class _Experts:
    """A quantized expert stack seen by transformers' eager experts loop: `stack[e]` is expert e's weight, made when
    the loop reaches it (so a forward holds one expert's dequantized weight at a time, not the layer's)."""

    def __init__(self, module: QuantizedModule, leaf: str):
        self.module, self.leaf = module, leaf

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.module._quantized_leaf(self.leaf, int(index))


_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type, leaves: tuple[str, ...]) -> type:
    """`cls` with each of `leaves` a property (the dequantized weight) and its forward inside a forward scope."""
    key = (cls, leaves)
    if key not in _CLASSES:
        eager = getattr(cls.forward, "__wrapped__", cls.forward)  # under transformers' experts dispatch: its loop

        def forward(self, *args, **kwargs):
            with self._forward_scope():
                if self.__dict__.get(PER_EXPERT):
                    return eager(self, *args, **kwargs)
                return cls.forward(self, *args, **kwargs)

        namespace = {"forward": forward, "__module__": __name__}
        for leaf in leaves:
            namespace[leaf] = property(lambda self, leaf=leaf: self._quantized_leaf(leaf))
        _CLASSES[key] = type(f"Quantized{cls.__name__}", (QuantizedModule, cls), namespace)
    return _CLASSES[key]


# ----------------------------------------------------------------------------------------------- the model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weights `quantize_base` keeps quantized.

    Returns:
        name -> module, in module order.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedModule)}


def quantized_leaf(module: nn.Module, name: str) -> str | None:
    """The quantized weight whose bytes `module`'s direct parameter `name` holds (its codes or its scale), or None."""
    leaves = module.__dict__.get(QUANTIZED, {})
    return next((leaf for leaf in leaves if name in (leaf + DATA, leaf + SCALE)), None)


def _owners(model: nn.Module, name_of: Callable[[str], str]) -> dict[str, tuple[nn.Module, str]]:
    """{name as the checkpoint reader knows it: (module owning the tensor, leaf name)} for `model`'s parameters
    (and the weights already quantized)."""
    owners = {}
    for name, module in model.named_modules():
        for leaf in [*module._parameters, *module.__dict__.get(QUANTIZED, {})]:
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
        quantized = module.__dict__.setdefault(QUANTIZED, {})
        if leaf in quantized:
            continue
        weight = module._parameters[leaf]
        if not weight.is_meta:
            raise QuantizationError(f"'{target}' holds weights already: keep_quantized needs a model streamed on meta")
        if weight.requires_grad:
            raise QuantizationError(
                f"'{target}' is trainable, but keep_quantized keeps the base frozen and trains LoRA adapters only: "
                "full fine-tuning needs the dequantized weights (load without keep_quantized), or add a LoRA adapter"
            )
        quantized[leaf] = (kind, tuple(weight.shape), weight.dtype)
        del module._parameters[leaf]
        for suffix, shape in ((DATA, data_shape), (SCALE, scale_shape)):
            param = nn.Parameter(torch.empty(tuple(shape), dtype=torch.uint8, device="meta"), requires_grad=False)
            setattr(param, LOGICAL_NUMEL, weight.numel() if suffix == DATA else 0)  # FSDP group sizes (layout)
            module.register_parameter(leaf + suffix, param)
        cls = type(module)
        base = cls.__mro__[2] if issubclass(cls, QuantizedModule) else cls
        module.__class__ = _quantized_class(base, tuple(sorted(quantized)))
        if len(quantized[leaf][1]) == 3:
            module.__dict__[PER_EXPERT] = experts == "per_expert"
        done += 1
    _wrap_expert_adapters(model)
    _refuse_merges(model)
    _refuse_trainable_base(model)
    return done


def _wrap_expert_adapters(model: nn.Module) -> None:
    """peft's routed-expert adapters over quantized experts apply their update through the quantized module."""
    if not any(True for _ in quantized_modules(model)):
        return
    try:
        param_wrapper = compat.param_wrapper_class()
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, param_wrapper):
            base = module.get_base_layer()
            if module.parameter_name in base.__dict__.get(QUANTIZED, {}):
                module.__class__ = compat.quantized_param_wrapper_class(type(module), _UPDATES)


def _cannot_merge(*args: Any, **kwargs: Any) -> None:
    raise QuantizationError(
        "a LoRA adapter cannot be merged into a quantized-resident base (its weights are computed from FP8 / FP4 "
        "bytes, and re-quantizing would round the update away): save the adapter and merge it into the checkpoint "
        "with hf_dsv4.merge_adapter (python -m hf_dsv4.merge), which writes a bf16 model"
    )


def _refuse_merges(model: nn.Module) -> None:
    """peft's merge would add the update to a dequantized copy and lose it: LoRA layers over quantized modules refuse
    it instead (`merge_and_unload` included)."""
    for module in model.modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") and hasattr(module, "lora_A") else None
        if base is not None and base is not module and isinstance(base, QuantizedModule):
            module.__dict__["merge"] = _cannot_merge


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
