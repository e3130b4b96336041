"""transformers' part of the fence: the private names of transformers that hf_dsv4 relies on (fences `transformers`:
models and their loading and saving; `transformers.attention`: DeepSeek-V4's attention, which
`hf_dsv4.modeling.sparse_attention` replaces or mirrors; `transformers.trainer`: the Trainer's internals, checked by
the training layer only) and the functions that reach them. `import transformers` here is transformers itself
(imports are absolute).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Iterator
from typing import Any

from . import Internal, require

# transformers' part of `hf_dsv4.compat.FENCE`: fence name -> (tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    "transformers": (">=5.24,<5.26", (
        Internal("transformers:PreTrainedModel.from_pretrained", why="replaced inside memory_efficient_init"),
        Internal("transformers:PreTrainedModel._from_config", ("config",), why="non-source ranks build on meta"),
        Internal("transformers:PreTrainedModel._no_split_modules", why="the decoder layers FSDP2 shards one by one"),
        Internal("transformers:PreTrainedModel._keep_in_fp32_modules_strict", why="fp32-kept FSDP groups"),
        Internal(
            "transformers:PreTrainedModel._load_pretrained_model",
            ("model", "state_dict", "checkpoint_files", "load_config", "expected_keys"),
            why="streamed loading: from_pretrained builds the model and its load plan, the weights are read later",
        ),
        Internal("transformers.modeling_utils:LoadStateDictInfo", why="what the captured load reports"),
        Internal(
            "transformers.core_model_loading:convert_and_load_state_dict_in_model",
            ("model", "state_dict", "load_config"),
            why="streamed loading converts one decoder layer at a time with transformers' own rules",
        ),
        Internal(
            "transformers.core_model_loading:convert_and_load_state_dict_in_model",
            decides=(
                'device_map = load_config.device_map or {"": "cpu"}',
                '"disk" in device_map.values()',
                "thread_pool = None",
                "param_device = get_device(device_map, renamed_key, valid_torch_device=True)",
            ),
            why="streamed reads convert in the calling thread (measured: less memory, no slower): a device_map "
            "entry naming no module, its value 'disk', turns the read pool off for one call",
        ),
        Internal(
            "transformers.integrations.accelerate:expand_device_map",
            ("device_map", "param_names"),
            decides=("device_map_regex.match(param)",),
            why="a device_map name places the tensors whose names start with it (so the entry above places none)",
        ),
        Internal(
            "transformers.core_model_loading:rename_source_key",
            ("source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict"),
            why="which model tensor (so which decoder layer) a checkpoint tensor feeds",
        ),
        Internal(
            "transformers.core_model_loading:convert_and_load_state_dict_in_model",
            decides=(
                "state_dict = sorted(state_dict.items(), key=lambda kv: dot_natural_key(kv[0]))",
                "renamed_key, source_pattern = rename_source_key( original_key, renamings, converters, "
                "base_model_prefix, meta_model_state_dict )",
                "if renamed_key not in meta_model_state_dict and original_key in meta_model_state_dict:",
                "renamed_key, source_pattern = rename_source_key( original_key, [], [], "
                "base_model_prefix=base_model_prefix, meta_state_dict=meta_model_state_dict )",
            ),
            why="the streamed reader assigns every checkpoint key to a model tensor as the load does (model_keys_of)",
        ),
        Internal("transformers.core_model_loading:dot_natural_key", ("s",), why="the order the load takes keys in"),
        Internal(
            "transformers.core_model_loading:revert_weight_conversion",
            assigned="_weight_conversions",
            why="the name conversions a load used, which a save reverts: every rank of an export uses rank 0's",
        ),
        Internal(
            "transformers.core_model_loading:revert_weight_conversion",
            ("model", "state_dict"),
            why="a sharded export names its files' tensors as save_pretrained does",
        ),
        Internal(
            "transformers.conversion_mapping:get_checkpoint_conversion_mapping",
            ("model_type",),
            why="an exported adapter's modules take the checkpoint's names (the mapping's renamings, reversed)",
        ),
        Internal("transformers.core_model_loading:WeightTransform.reverse_transform", (), why="the same"),
        Internal("transformers.core_model_loading:WeightTransform.rename_source_key", ("source_key",), why="the same"),
        Internal(
            "transformers.integrations.finegrained_fp8:Fp8Dequantize._dequantize_one",
            ("quantized", "scales", "output_dtype"),
            why="a quantized-resident base dequantizes each layer with the arithmetic a dequantizing load uses",
        ),
        Internal(
            "transformers:PretrainedConfig._experts_implementation",
            why="quantized routed experts computed per expert run transformers' eager loop (their module's config)",
        ),
    )),
    # DeepSeek-V4 attention (hf_dsv4.modeling.sparse_attention): what is replaced or mirrored is pinned by its source
    # (one hash per tested source; 5.24 and 5.25 share them)
    "transformers.attention": (">=5.24,<5.26", (
        Internal("transformers:AttentionInterface.register", why="the sparse attention is registered as an implementation"),
        Internal("transformers.masking_utils:AttentionMaskInterface.register", why="and its mask, kept as a function"),
        Internal(
            "transformers.masking_utils:sdpa_mask",
            ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask"),
            why="the sparse mask evaluates transformers' mask function one block of queries at a time",
        ),
        Internal("transformers.masking_utils:and_masks", why="flex kernel: the mask function with its padding"),
        Internal("transformers.masking_utils:padding_mask_function", ("padding_mask",), why="the same"),
        Internal(
            "transformers.masking_utils:prepare_padding_mask",
            ("attention_mask", "kv_length", "kv_offset"),
            why="the same",
        ),
        Internal(
            "transformers.masking_utils:eager_mask",
            ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask", "dtype"),
            why="the dense fallback (generation with a cache) builds the mask stock eager gets",
        ),
        Internal(
            "transformers.models.deepseek_v4.modeling_deepseek_v4:DeepseekV4CSACompressor.forward",
            source=("3644b0ea966e20d2",),
            why="its cache-less compression is reproduced op for op (overlap_compress), its dense block bias is not",
        ),
        Internal(
            "transformers.models.deepseek_v4.modeling_deepseek_v4:DeepseekV4Indexer.forward",
            source=("428c5223ef907ac9",),
            why="reproduced with the scores computed in query chunks (indexer_topk)",
        ),
        Internal(
            "transformers.models.deepseek_v4.modeling_deepseek_v4:DeepseekV4HCACompressor.forward",
            source=("3fb94114cb4ed493",),
            why="its cache-less compression is reproduced op for op (hca_compress), its dense block bias is not",
        ),
        Internal(
            "transformers.models.deepseek_v4.modeling_deepseek_v4:DeepseekV4Attention.forward",
            source=("7e61a222ad0603b7",),
            why="calls the compressor then the registered attention; a non-tensor mask is passed through untouched; "
            "context parallelism reproduces it op for op on a rank's chunk",
        ),
        Internal(
            "transformers.models.deepseek_v4.modeling_deepseek_v4:eager_attention_forward",
            source=("3cb759e14962bed1",),
            why="the sparse attention mirrors its arithmetic (dtypes, sinks, max subtraction) per block",
        ),
        Internal(
            "transformers.models.deepseek_v4.modeling_deepseek_v4:apply_rotary_pos_emb",
            ("x", "cos", "sin"),
            why="the compressed entries' rope",
        ),
    )),
    "transformers.trainer": (">=5.24,<5.26", (
        Internal("transformers.trainer:Accelerator", why="swapped for DSV4Accelerator by dsv4_trainer_accelerator"),
        Internal("transformers:Trainer._save_optimizer_and_scheduler", ("output_dir",), why="overridden"),
        Internal("transformers:Trainer._load_from_checkpoint", ("resume_from_checkpoint", "model"), why="overridden"),
        Internal("transformers:Trainer._load_optimizer_and_scheduler", ("checkpoint",), why="overridden"),
        Internal(
            "transformers:Trainer._prepare_context_parallel_inputs",
            ("model", "inputs"),
            why="overridden: each rank's contiguous chunk for hf_dsv4's context parallelism",
        ),
    )),
}  # fmt: skip


# ------------------------------------------------------------------------------------- models, loading, saving


def from_config(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
    """`cls._from_config(config, ...)`: a model built from its config (under a meta device context: no memory)."""
    return cls._from_config(config, *args, **kwargs)


def no_split_modules(model: Any) -> list[str]:
    """The class names a transformers model says must not be split (its decoder layers)."""
    return list(model._no_split_modules or ())


def keep_in_fp32_modules(model: Any) -> list[str]:
    """The module names a transformers model keeps in fp32 whatever its dtype."""
    return list(model._keep_in_fp32_modules_strict or ())


def from_pretrained_keywords() -> set[str]:
    """Every keyword `PreTrainedModel.from_pretrained` takes: its signature's, and the names it pops off `kwargs`
    (read from its source; what `hf_dsv4.loading`'s keyword tables are tested against)."""
    from transformers import PreTrainedModel

    method = PreTrainedModel.from_pretrained
    names = {p.name for p in inspect.signature(method).parameters.values() if p.kind is p.KEYWORD_ONLY}
    names |= {p.name for p in inspect.signature(method).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD}
    source = inspect.getsource(method)
    names |= set(re.findall(r'kwargs\.pop\(\s*"(\w+)"', source))
    for listed in re.findall(r"for \w+ in \[([^\]]*)\]:\s*\n\s*\w+ = kwargs\.pop\(", source):
        names |= set(re.findall(r'"(\w+)"', listed))
    return names - {"pretrained_model_name_or_path"}


def weight_conversions(model: Any) -> Any:
    """The name conversions `from_pretrained` used to load `model` (what `save_pretrained` reverts), or None."""
    return getattr(model, "_weight_conversions", None)


def set_weight_conversions(model: Any, conversions: Any) -> None:
    """Record on `model` the name conversions a load used (a model built from its config has none)."""
    model._weight_conversions = conversions


def revert_weight_conversion(model: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` (model names -> full tensors) under the names and layout of the checkpoint the model loads from:
    what `save_pretrained` writes (for DeepSeek-V4 the fused experts split per expert again). Conversions never span
    decoder layers, so one layer's tensors can be converted on their own."""
    from transformers.core_model_loading import revert_weight_conversion as revert

    return revert(model, state_dict)


def checkpoint_module_name(model_type: str, name: str) -> str:
    """The checkpoint's name for the model's tensor `name` (`model.layers.0.self_attn.q_a_proj.weight` ->
    `layers.0.attn.wq_a.weight` for deepseek_v4): transformers' renamings for `model_type`, reversed and applied in
    reverse order, without the `model.` prefix the loader adds. Fused tensors keep their fused name."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [m for m in get_checkpoint_conversion_mapping(model_type) or [] if isinstance(m, WeightRenaming)]
    name = name.removeprefix("model.")
    for renaming in reversed(renamings):
        name, _ = renaming.reverse_transform().rename_source_key(name)
    return name


@contextlib.contextmanager
def weights_not_read(capture: dict[str, Any]) -> Iterator[None]:
    """Scope under which `from_pretrained` does everything but read weights: the model is built (config, quantizer,
    dtypes, fp32-kept modules, non-persistent buffers computed) with its parameters left on meta, and the checkpoint
    files and load plan (`LoadStateDictConfig`: weight conversions, quantizer, dtype) land in `capture`
    (`checkpoint_files`, `load_config`). Restored on exit, also on error."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import LoadStateDictInfo

    original = PreTrainedModel.__dict__["_load_pretrained_model"]

    def record(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        if state_dict is not None or not checkpoint_files or not str(checkpoint_files[0]).endswith(".safetensors"):
            raise ValueError("streamed loading reads safetensors checkpoint files (no state_dict, no .bin files)")
        capture.update(checkpoint_files=list(checkpoint_files), load_config=load_config)
        empty = LoadStateDictInfo(
            missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[], conversion_errors={},
            skipped_pp_keys=set(),
        )  # fmt: skip
        return empty, None

    PreTrainedModel._load_pretrained_model = staticmethod(record)
    try:
        yield
    finally:
        PreTrainedModel._load_pretrained_model = original


def model_keys_of(model: Any, load_config: Any, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """For each checkpoint key, the model's state-dict name `from_pretrained` loads it into (a fused tensor's name for
    each of its parts), decided as `convert_and_load_state_dict_in_model` decides: the keys in its order, every
    renaming and at most one converter, and where the renamed key is not the model's but the key as stored is, the
    key as stored (base-model prefix added or stripped). The fallback is what loads a `save_pretrained` checkpoint:
    its `model.norm.weight` would be renamed `model.kv_norm.weight` by the release layout's `.norm.` rule.

    Refused, before any weight is read, where a streamed read could disagree with the load: a conversion plan with an
    order-dependent renaming (a subclass of `WeightRenaming`, e.g. one activated by the first key it sees: the
    streamed reader converts one unit at a time, out of the load's order), and two stored tensors that would both
    load into one model tensor with no converter merging them (the load keeps whichever it reads last)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = load_config.weight_mapping or []
    stateful = sorted({type(m).__name__ for m in mapping if type(m) not in (WeightRenaming, WeightConverter)})
    if stateful:
        raise ValueError(
            f"the conversion plan of this checkpoint holds {', '.join(stateful)} (renamings that depend on the order "
            "keys are read in), which a streamed read cannot reproduce unit by unit: load it with stream_weights=False"
        )
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix, meta_state_dict = model.base_model_prefix, model.state_dict()
    targets, plain = {}, {}
    for key in sorted(checkpoint_keys, key=dot_natural_key):
        target, converted = rename_source_key(key, renamings, converters, prefix, meta_state_dict)
        if target not in meta_state_dict and key in meta_state_dict:
            target, converted = rename_source_key(
                key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state_dict
            )
        if converted is None and target in plain:
            raise ValueError(
                f"checkpoint tensors '{plain[target]}' and '{key}' would both load into '{target}' (renamed, no "
                "converter merges them): the checkpoint mixes two layouts; keep one of them"
            )
        if converted is None:
            plain[target] = key
        targets[key] = target
    return targets


# A device-map entry that names no module: its "disk" value turns transformers' read pool off for one call.
READ_IN_THE_CALLING_THREAD = "hf_dsv4:read-in-the-calling-thread"


def convert_into(model: Any, tensors: dict[str, Any], load_config: Any) -> Any:
    """Load checkpoint `tensors` (safetensors slices; a subset of the checkpoint) into `model` as `from_pretrained`
    would (renamed, fused, dequantized, cast); returns transformers' `LoadStateDictInfo` for them.

    The tensors are read in the calling thread: transformers' read pool starts its threads anew for every call, and
    their memory arenas kept freed pieces, so on 2 CPU ranks a streamed read in pool threads held more memory and was
    not faster (1 GB checkpoint, every rank reading: 850 vs 680 MB per rank, 0.97 vs 0.86 s; a Flash-width layer read
    in 512 MB pieces: rank 0 10.9 vs 9.6 GB).

    transformers (5.24, 5.25) offers no argument for it: `convert_and_load_state_dict_in_model` builds its
    `ThreadPoolExecutor` unless the process-wide `HF_DEACTIVATE_ASYNC_LOAD` is set, a `device_map` value is "disk" or
    the quantization is on the fly. This call hands it a copy of `load_config` whose `device_map` adds one "disk"
    entry under a name no module has (`READ_IN_THE_CALLING_THREAD`; `expand_device_map` matches names from their
    start, so no tensor is placed by it): the pool is off for this call only, in this thread only, and no variable
    of the process changes (setting one on the read-ahead thread would reach any load running beside it).
    `load_config` itself is left as it was."""
    import dataclasses

    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.utils import logging as hf_logging

    device_map = {**(load_config.device_map or {"": "cpu"}), READ_IN_THE_CALLING_THREAD: "disk"}
    load_config = dataclasses.replace(load_config, device_map=device_map)
    quiet = hf_logging.is_progress_bar_enabled()  # one bar per unit would flood the log: the caller shows one
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=tensors, load_config=load_config)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return info


# ----------------------------------------------------------------------------------------------------- trainer


@contextlib.contextmanager
def trainer_accelerator_class(cls: type) -> Iterator[None]:
    """Scope under which `transformers.Trainer` builds its accelerator from `cls` (restored on exit, also on error)."""
    import transformers.trainer as trainer_module

    original = trainer_module.Accelerator
    if not (isinstance(cls, type) and issubclass(cls, original)):
        raise TypeError(f"{cls!r} must be a subclass of {original.__qualname__}")
    trainer_module.Accelerator = cls
    try:
        yield
    finally:
        trainer_module.Accelerator = original


# --------------------------------------------------------------------------------------------------- attention


def sdpa_mask(**kwargs: Any) -> Any:
    """transformers' boolean mask builder (`masking_utils.sdpa_mask`)."""
    from transformers.masking_utils import sdpa_mask as build

    return build(**kwargs)


def mask_function_with_padding(mask: Any) -> Any:
    """A `SparseMask`'s mask function with its padding mask folded in, as `sdpa_mask` folds it."""
    from transformers.masking_utils import and_masks, padding_mask_function, prepare_padding_mask

    padding = prepare_padding_mask(mask.attention_mask, mask.kv_length, mask.kv_offset)
    return mask.mask_function if padding is None else and_masks(mask.mask_function, padding_mask_function(padding))


def eager_mask(**kwargs: Any) -> Any:
    """transformers' additive mask builder for eager attention (`masking_utils.eager_mask`)."""
    from transformers.masking_utils import eager_mask as build

    return build(**kwargs)


def dsv4_apply_rotary_pos_emb(x: Any, cos: Any, sin: Any) -> Any:
    """DeepSeek-V4's interleaved partial rope (`modeling_deepseek_v4.apply_rotary_pos_emb`)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, cos, sin)


def dsv4_eager_attention_forward(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
    """DeepSeek-V4's stock attention (`modeling_deepseek_v4.eager_attention_forward`)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import eager_attention_forward

    return eager_attention_forward(module, query, key, value, mask, **kwargs)


# ------------------------------------------------------------------------------------------------ quantization


def dequantize_blocks(codes: Any, scales: Any, dtype: Any) -> Any:
    """FP8 (e4m3 codes) or FP4 (e2m1 codes packed two per int8) weights times their ue8m0 block scales, in `dtype`:
    transformers' `Fp8Dequantize` arithmetic, the one a dequantizing `from_pretrained` applies (block size from the
    shapes; a leading experts dimension kept)."""
    require("transformers")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(codes, scales, dtype)


def eager_experts_config(config: Any) -> Any:
    """A copy of `config` whose experts compute with transformers' eager loop (expert by expert), whatever the model's
    experts implementation: for one experts module (its `config`), as `set_experts_implementation("eager")` does
    for a whole model."""
    import copy

    require("transformers")
    eager = copy.copy(config)
    eager._experts_implementation = "eager"
    return eager
