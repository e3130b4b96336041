"""The fence around upstream internals: every private name of torch, transformers, accelerate, trl and peft that
hf_dsv4 overrides, calls, reads or replaces is listed here, checked when the layer that uses it is imported, and
(where hf_dsv4 touches it directly) reached only through a function of this module.

`require("trl")` (run by `hf_dsv4.training` at import) fails with `UpstreamCompatError`, naming the package, its
installed version and the versions hf_dsv4 was tested with, if a listed name is gone or its parameters changed; a
version outside the tested range that still has every name only logs a warning. Fence names are packages, or a
package's part that only one layer needs ("transformers.trainer": the Trainer's internals, checked by the training
layer, so that loading and sharding never import the Trainer). The tested ranges are the upper
bounds in setup.cfg. The overrides themselves (`DSV4Accelerator._prepare_fsdp2`, `DSV4SFTTrainer._prepare_dataset`
and the Trainer's checkpoint hooks) live in their subclasses; their upstream signatures are checked here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from typing import Any

from packaging.specifiers import SpecifierSet

logger = logging.getLogger(__name__)


class UpstreamCompatError(ImportError):
    """An installed package lacks an internal name that hf_dsv4 relies on (or its parameters changed)."""


@dataclass(frozen=True)
class Internal:
    """`module:attribute.path`, optionally with the parameter names hf_dsv4 relies on (in order, after `self`).
    An instance attribute is named as `module:Class.__init__` with `assigned` = the attribute `__init__` sets; a
    function that must still read a setting names it in `assigned` too (as `self.x` or a quoted name)."""

    where: str
    params: tuple[str, ...] | None = None
    why: str = ""
    assigned: str | None = None
    # sha256 prefixes of the sources hf_dsv4 reproduces or relies on line by line, one per tested version that differs
    source: tuple[str, ...] | None = None
    # lines of the source that hf_dsv4 reproduces (a decision inside a long function): each must still be there
    decides: tuple[str, ...] = ()


# fence name (a package, or "package.part") -> (the package's tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    "torch": (">=2.13,<2.16", (  # else public APIs only (FSDP2, DCP, DTensor); the range is the tested one
        Internal(
            "torch._C:DisableTorchFunctionSubclass",
            why="a quantized weight's `__torch_function__` runs the op itself, results left as they are (the default "
            "would turn every result into the subclass)",
        ),
        Internal(
            "torch._ops:OpOverload.__init__",
            assigned="_schema",
            why="a quantized weight refuses the ops that write into their arguments (peft's merge): the op's schema",
        ),
        Internal(
            "torch.utils._python_dispatch:is_traceable_wrapper_subclass",
            why="a quantized weight implements that protocol (`__tensor_flatten__` / `__tensor_unflatten__`), so "
            "torch's memory tracker counts its bytes and parametrize swaps it instead of `set_`",
        ),
        Internal(
            "torch:Tensor._make_wrapper_subclass",
            why="a quantized weight is a tensor of the weight's shape and dtype that holds its bytes (torchao's "
            "pattern for NF4 / float8 weights; `hf_dsv4.sharding.quantized.QuantizedWeight`)",
        ),
        Internal(
            "torch._subclasses.fake_tensor:is_fake", ("x",),
            why="packed rows are read from position values: a traced (fake) tensor has none (the Flash rehearsal)",
        ),
    )),
    "torch.tools": (">=2.13,<2.16", (  # what the benchmarks and the Flash rehearsal measure with, never training
        Internal(
            "torch.distributed._tools.mem_tracker:MemTracker.get_tracker_snapshot", ("type",),
            why="the logical peak of live tensors, by category (parameters, gradients, activations, optimizer)",
        ),
        Internal("torch.distributed._tools.mem_tracker:MemTracker.track_external", why="tensors made before"),
        Internal("torch.distributed._tools.mem_tracker:MemTracker.reset_mod_stats", (), why="one step after another"),
        Internal(
            "torch.distributed._tools.fsdp2_mem_tracker:FSDPMemTracker.__init__", ("mod", "optm"),
            why="the same, with FSDP2's all-gathered and reduce-scattered buffers counted apart",
        ),
        Internal("torch._subclasses.fake_tensor:FakeTensorMode", why="the rehearsal traces without allocating"),
        Internal("torch.testing._internal.distributed.fake_pg:FakeStore", why="N ranks in one process"),
    )),
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
    "accelerate": (">=1.15,<1.17", (
        Internal("accelerate:Accelerator._prepare_fsdp2", ("args",), why="overridden: shard_model instead"),
        Internal(
            "accelerate:Accelerator._prepare_cp", ("args",), why="overridden: enable_context_parallel instead of torch's"
        ),
        Internal("accelerate:Accelerator._prepare_one", ("obj", "first_pass"), why="called for optimizers"),
        Internal("accelerate:Accelerator.__init__", assigned="_models", why="sharded models are registered there"),
        Internal("accelerate:PartialState._shared_state", why="FSDP on CPU processes"),
        Internal(
            "accelerate.parallelism_config:ParallelismConfig._validate_accelerator",
            ("accelerator",),
            why="checked once CPU processes are switched to FSDP (accelerate checks before, and refuses MULTI_CPU)",
        ),
    )),
    "trl": (">=1.16,<1.17", (
        Internal(
            "trl:SFTTrainer._prepare_dataset",
            ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
            why="overridden: rows tokenized by hf_dsv4.training.data",
        ),
    )),
    "peft": (">=0.21,<0.22", (
        Internal("peft.tuners.lora.layer:ParamWrapper.get_param", (), why="routed-expert adapter dtype alignment"),
        Internal(
            "peft.tuners.lora.layer:_LoraFactorsProxy.forward",
            ("W",),
            why="over quantized routed experts peft's fold reaches the quantized weight as this `baddbmm`, which it "
            "makes lazily (per expert: `QuantizedWeight.__torch_function__`)",
            decides=("return torch.baddbmm(W, self.lhs, self.rhs, alpha=self.scaling)",),
        ),
    )),
}  # fmt: skip

_checked: set[str] = set()


def _resolve(where: str) -> Any:
    module_name, _, path = where.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in path.split("."):
        if part not in dir(obj) and not hasattr(obj, part):
            raise AttributeError(part)
        obj = getattr(obj, part)
    return obj


def _problem(internal: Internal) -> str | None:
    """Why `internal` is unusable, or None."""
    try:
        obj = _resolve(internal.where)
    except (ImportError, AttributeError):
        return f"{internal.where} is missing"
    if internal.source is not None:
        digest = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
        if not digest.startswith(internal.source):
            follows = " or ".join(internal.source)
            return f"{internal.where} changed (source sha256 {digest[:16]}, hf_dsv4 follows {follows})"
    if internal.decides:
        code = re.sub(r"\s+", " ", inspect.getsource(obj))
        for line in internal.decides:
            if re.sub(r"\s+", " ", line) not in code:
                return f"{internal.where} no longer does `{line}`"
    if internal.assigned is not None:
        if not re.search(rf"self\.{internal.assigned}\b|[\"']{internal.assigned}[\"']", inspect.getsource(obj)):
            return f"{internal.where} no longer sets {internal.assigned}"
        return None
    if internal.params is None:
        return None
    names = [p for p in inspect.signature(obj).parameters if p != "self"]
    if names[: len(internal.params)] != list(internal.params):
        return f"{internal.where} takes ({', '.join(names)}), hf_dsv4 expects ({', '.join(internal.params)})"
    return None


def require(*names: str) -> None:
    """Check every internal of the fences `names` (once per process); raise `UpstreamCompatError` if one is unusable."""
    for name in names:
        if name in _checked:
            continue
        tested, internals = FENCE[name]
        package = name.split(".")[0]
        found = installed_version(package)
        problems = [p for p in map(_problem, internals) if p is not None]
        if problems:
            raise UpstreamCompatError(
                f"hf_dsv4 cannot use {package} {found}: " + "; ".join(problems) + f". hf_dsv4 is tested with "
                f"{package}{tested}: pip install '{package}{tested}'"
            )
        if not SpecifierSet(tested).contains(found.split("+")[0], prereleases=True):
            logger.warning(
                "%s %s is outside the versions hf_dsv4 is tested with (%s); the %d internals of fence %r that hf_dsv4 "
                "relies on are unchanged",
                package, found, tested, len(internals), name,
            )  # fmt: skip
        _checked.add(name)


# ------------------------------------------------------------------------------------------------ transformers


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


# ------------------------------------------------------------------------------------------------- accelerate


def prepare_one(accelerator: Any, obj: Any, first_pass: bool = False) -> Any:
    """What `Accelerator.prepare` does to one non-model object (optimizer, scheduler, data loader)."""
    return accelerator._prepare_one(obj, first_pass=first_pass)


def register_prepared_model(accelerator: Any, model: Any) -> None:
    """Record `model` as prepared, as `Accelerator.prepare` does (saving, `unwrap_model` and `free_memory` read it)."""
    accelerator._models.append(model)


def set_process_distributed_type(value: Any) -> Callable[[], None]:
    """Set accelerate's process-wide `PartialState().distributed_type` to `value`; returns the function that puts
    back what was there (call it once, when the accelerator that needed the change is done)."""
    from accelerate import PartialState

    shared = PartialState._shared_state
    missing = object()
    before = shared.get("distributed_type", missing)
    shared["distributed_type"] = value

    def restore() -> None:
        if shared.get("distributed_type", missing) is not value:
            return  # accelerate reset or changed the state since: leave it
        if before is missing:
            shared.pop("distributed_type", None)
        else:
            shared["distributed_type"] = before

    return restore


@contextlib.contextmanager
def parallelism_check_deferred(checks: list) -> Iterator[None]:
    """Scope under which `Accelerator.__init__` records its `ParallelismConfig` check instead of running it (in
    `checks`, as callables): the caller runs them once it has set the accelerator up (restored on exit, also on
    error)."""
    from accelerate.parallelism_config import ParallelismConfig

    original = ParallelismConfig.__dict__["_validate_accelerator"]

    def record(self, accelerator):
        checks.append(lambda: original(self, accelerator))

    ParallelismConfig._validate_accelerator = record
    try:
        yield
    finally:
        ParallelismConfig._validate_accelerator = original


# ------------------------------------------------------------------------------------------------------- peft


def param_wrapper_class() -> type:
    """peft's LoRA wrapper for adapters applied through `target_parameters` (routed experts)."""
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


# ------------------------------------------------------------------------------------------------ attention


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


# ------------------------------------------------------------------------------------------------ torch tensors


def make_wrapper_subclass(cls: type, like: Any, device: Any) -> Any:
    """A tensor of subclass `cls` with `like`'s shape, strides and dtype on `device`, holding no storage of its own
    (the subclass holds its data: `hf_dsv4.sharding.quantized.QuantizedWeight`)."""
    import torch

    return torch.Tensor._make_wrapper_subclass(
        cls, like.shape, strides=like.stride(), storage_offset=like.storage_offset(), dtype=like.dtype,
        device=device, requires_grad=False,
    )  # fmt: skip


def writes_into_arguments(op: Any) -> bool:
    """Whether the aten operator `op` writes into one of its arguments (in place or `out=`)."""
    return op._schema.is_mutable


def subclass_functions_disabled() -> Any:
    """A context in which tensor subclasses' `__torch_function__` is off: a subclass's own `__torch_function__`
    calls the op in it (as torch's wrapper subclasses do)."""
    import torch

    return torch._C.DisableTorchFunctionSubclass()


# ------------------------------------------------------------------------------------------------ torch autograd


def is_fake(tensor: Any) -> bool:
    """Whether `tensor` is a fake tensor (shapes without values: traced under `FakeTensorMode`)."""
    from torch._subclasses.fake_tensor import is_fake as fake

    return fake(tensor)


# ------------------------------------------------------------------------------------------------ torch tools


def memory_tracker(model: Any = None, optimizer: Any = None, existing: Sequence[Any] = ()) -> Any:
    """torch's tracker of live tensors (a context manager): FSDP2's (`FSDPMemTracker`, which counts all-gathered
    and reduce-scattered buffers apart) for a model with FSDP2 groups, else the plain `MemTracker`.

    Args:
        model: the module whose parameters, gradients and buffers are tracked from before the tracker is entered.
        optimizer: the optimizer whose states are tracked likewise.
        existing: other tensors made before, tracked likewise (plain tracker only).

    Returns:
        The tracker, to be entered (`with`).

    Raises:
        ValueError: `existing` tensors with an FSDP2 model (its tracker takes the model and optimizer alone).
    """
    require("torch.tools")
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if model is not None and isinstance(model, FSDPModule):
        if existing:
            raise ValueError("memory_tracker: no `existing` tensors with an FSDP2 model (its tracker takes the model)")
        return FSDPMemTracker(model, optimizer)
    tracker = MemTracker()
    tracker.track_external(*[x for x in (model, optimizer, *existing) if x is not None])
    return tracker


def tracker_peak(tracker: Any) -> dict[str, dict[str, int]]:
    """A tracker's peak bytes per device ("cpu", "cuda:0") and category (lower-case names: "param", "grad", "act",
    "temp", "opt", "buffer", "oth", "total"; FSDP2's "all_gather", "reduce_scatter", ...)."""
    snapshot = tracker.get_tracker_snapshot("peak")
    return {
        str(device): {getattr(k, "name", str(k)).lower(): int(v) for k, v in categories.items()}
        for device, categories in snapshot.items()
    }


def end_of_step(tracker: Any) -> None:
    """Let a tracker see the next step (it refuses a module's second forward otherwise)."""
    tracker.reset_mod_stats()


def fake_tensor_mode() -> Any:
    """A `FakeTensorMode`: tensors with shapes, dtypes and devices but no storage."""
    require("torch.tools")
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_store() -> Any:
    """torch's fake process-group store: `init_process_group("fake", store=fake_store(), rank=r, world_size=n)`
    makes N ranks in one process whose collectives return without moving data."""
    require("torch.tools")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


require("torch", "transformers")
