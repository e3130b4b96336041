"""FSDP2 for DeepSeek-V4: one copy of the weights on rank 0, sent into every shard through DCP.

`shard_model` applies `fully_shard` per decoder layer, then to what is left, then to the root, with one FSDP
group per parameter dtype (DeepSeek-V4 keeps hyper-connections, sinks, position biases and norms in fp32 inside bf16
layers, and FSDP2 allows one original dtype per group). fp32-kept modules and FP8/integer tensors keep their dtype
under any `MixedPrecisionPolicy`. Weights come from rank 0 through
`set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`, so the other ranks can hold a meta model
(see `hf_dsv4.memory_efficient_init`). Before anything is sent, every rank checks its model against rank 0's, and a
mismatch raises the same `ShardingError` on every rank.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import PreTrainedModel

from .lora import align_parameter_adapter_dtypes

logger = logging.getLogger(__name__)

# (dtype, keep): parameters of one FSDP group share both. `keep` = compute in the stored dtype, whatever the
# mixed-precision policy (fp32-kept modules, FP8 and integer tensors).
GroupKey = tuple[torch.dtype, bool]
_CASTABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ShardingError(RuntimeError):
    """The model on some rank does not match rank 0's; raised with the same message on every rank."""


# ----------------------------------------------------------------------------------------------- model inspection


def _pretrained_models(model: nn.Module) -> list[PreTrainedModel]:
    """The transformers models in `model`'s tree (the model itself, or the one inside a PeftModel)."""
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose class is named in a `_no_split_modules` anywhere in the tree (the decoder layers); also after
    `fully_shard`, which swaps a module's class for an `FSDP<name>` subclass."""
    names = {name for m in _pretrained_models(model) for name in (m._no_split_modules or ())}
    return [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]


def _keep_fp32_pattern(model: nn.Module) -> re.Pattern | None:
    """A regex that matches the names of parameters in `_keep_in_fp32_modules_strict` modules."""
    keys = {k for m in _pretrained_models(model) for k in (m._keep_in_fp32_modules_strict or ())}
    if not keys:
        return None
    return re.compile(r"(^|\.)(" + "|".join(map(re.escape, sorted(keys))) + r")(\.|$)")


def group_keys(model: nn.Module) -> dict[nn.Parameter, GroupKey]:
    """The FSDP group key of every parameter: its dtype, and whether it must be computed in that dtype."""
    pattern = _keep_fp32_pattern(model)
    keys = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        keep = param.dtype not in _CASTABLE or (pattern is not None and pattern.search(name) is not None)
        keys[param] = (param.dtype, keep)
    return keys


def _unsharded_params(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of `module` not already managed by a `fully_shard`-ed submodule."""
    yield from module.parameters(recurse=False)
    for child in module.children():
        if not isinstance(child, FSDPModule):
            yield from _unsharded_params(child)


# ------------------------------------------------------------------------------------------------- validation


def _tensor_table(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, dtype, kind) for every parameter and buffer (kind: parameter / buffer / non-persistent)."""
    table = {}
    for name, param in model.named_parameters():
        table[name] = (tuple(param.shape), str(param.dtype), "parameter")
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        kind = "buffer" if name in persistent else "non-persistent buffer"
        table[name] = (tuple(buffer.shape), str(buffer.dtype), kind)
    return table


def _compare_tables(rank: int, source: dict, local: dict) -> list[str]:
    """Human-readable differences between rank 0's table and this rank's."""
    problems = []
    for name, (shape, dtype, kind) in source.items():
        if name not in local:
            problems.append(f"rank {rank}: {kind} '{name}' {shape} {dtype} is missing (rank 0 has it)")
        elif local[name] != (shape, dtype, kind):
            problems.append(f"rank {rank}: '{name}' is {local[name]} but {(shape, dtype, kind)} on rank 0")
    problems += [f"rank {rank}: unexpected {local[n][2]} '{n}' (not on rank 0)" for n in local if n not in source]
    return problems


def _meta_on_source(model: nn.Module) -> list[str]:
    """Rank 0 must hold real weights: the names of its meta tensors, as problems."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [f"rank 0: '{n}' is on the meta device; load rank 0's weights first" for n, t in named if t.is_meta]


def validate_against_source(model: nn.Module) -> None:
    """Collective: rank 0 sends its name -> (shape, dtype) table; any difference on any rank raises everywhere."""
    rank = dist.get_rank()
    local = _tensor_table(model)
    source = [local if rank == 0 else None]
    dist.broadcast_object_list(source, src=0)
    problems = _meta_on_source(model) if rank == 0 else _compare_tables(rank, source[0], local)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    problems = [p for rank_problems in gathered for p in rank_problems]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ShardingError(
            f"the model differs from rank 0's on {len(problems)} tensor(s); build every rank from the same "
            f"checkpoint and config (hf_dsv4.memory_efficient_init does):\n  {shown}"
        )


# ------------------------------------------------------------------------------------------------- sharding


def _main_key(module: nn.Module, keys: dict[nn.Parameter, GroupKey]) -> GroupKey | None:
    """The group key holding most elements among `module`'s unsharded parameters."""
    sizes = Counter()
    for param in _unsharded_params(module):
        sizes[keys[param]] += param.numel()
    return sizes.most_common(1)[0][0] if sizes else None


_PARAM_CONTAINERS = (nn.ParameterDict, nn.ParameterList)
_MODULE_CONTAINERS = (nn.ModuleDict, nn.ModuleList)


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters `module` uses itself: direct ones and those in its ParameterDict/ParameterList children, which
    are never called (so FSDP could not all-gather them as a group of their own)."""
    params = list(module.parameters(recurse=False))
    for child in module.children():
        if isinstance(child, _PARAM_CONTAINERS):
            params += list(child.parameters())
    return params


def _called_modules(module: nn.Module) -> list[nn.Module]:
    """`module`, or for a ModuleDict/ModuleList (never called itself) the modules inside it that hold parameters."""
    if not isinstance(module, _MODULE_CONTAINERS):
        return [module]
    return [
        m for child in module.children() if any(True for _ in _unsharded_params(child)) for m in _called_modules(child)
    ]


def _plan_dtype_groups(
    module: nn.Module, main: GroupKey, keys: dict[nn.Parameter, GroupKey], depth: int = 0
) -> list[tuple[int, GroupKey, nn.Module]]:
    """(depth, key, submodule) for every submodule that must be its own group so that `module`'s group holds only
    `main` parameters. Deeper entries nest in shallower ones and must be sharded first."""
    plan = []
    direct = {keys[p] for p in _own_params(module)}
    if direct - {main}:
        if len(direct) > 1:
            raise ShardingError(f"{type(module).__name__} directly owns parameters of several dtypes: {direct}")
        main = direct.pop()
        plan.append((depth, main, module))
        depth += 1
    for child in module.children():
        if isinstance(child, (FSDPModule, *_PARAM_CONTAINERS)):
            continue
        child_keys = {keys[p] for p in _unsharded_params(child)}
        if child_keys <= {main}:
            continue
        if len(child_keys) == 1:
            key = child_keys.pop()
            plan += [(depth, key, called) for called in _called_modules(child)]
        else:
            plan += _plan_dtype_groups(child, main, keys, depth)
    return plan


def _policy(key: GroupKey, mixed_precision: MixedPrecisionPolicy | None) -> MixedPrecisionPolicy:
    """The user's policy for castable groups; no casting at all for kept (fp32-kept, FP8, integer) groups."""
    return MixedPrecisionPolicy() if key[1] or mixed_precision is None else mixed_precision


def _shard_by_dtype(module: nn.Module, keys: dict, mixed_precision: MixedPrecisionPolicy | None, **fsdp_kwargs) -> None:
    """`fully_shard` `module` as one group per dtype key: nested groups first, then `module` with its main key."""
    main = _main_key(module, keys)
    if main is None:
        return
    by_level = defaultdict(list)
    for depth, key, submodule in _plan_dtype_groups(module, main, keys):
        by_level[(depth, key)].append(submodule)
    for depth, key in sorted(by_level, key=lambda level: -level[0]):
        fully_shard(by_level[(depth, key)], mp_policy=_policy(key, mixed_precision), **fsdp_kwargs)
    if not isinstance(module, FSDPModule):
        fully_shard(module, mp_policy=_policy(main, mixed_precision), **fsdp_kwargs)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    mixed_precision: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
) -> None:
    """`fully_shard` each decoder layer, then what is left (embeddings, head, final norms), then the root."""
    keys = group_keys(model)
    kwargs = dict(mesh=mesh, offload_policy=offload_policy or OffloadPolicy())
    layers = decoder_layers(model)
    if not layers:
        raise ShardingError(f"no decoder layer found in {type(model).__name__} (no `_no_split_modules` match)")
    for layer in layers:
        _shard_by_dtype(layer, keys, mixed_precision, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root is all-gathered first in forward and needed again at the end (head): keep it unsharded in between.
    _shard_by_dtype(model, keys, mixed_precision, reshard_after_forward=False, **kwargs)
    if not isinstance(model, FSDPModule):  # a root without parameters of its own
        fully_shard(model, mp_policy=_policy((torch.float32, True), mixed_precision), **kwargs)


# ------------------------------------------------------------------------------------------------- weights


def _tie_weights(model: nn.Module) -> None:
    """`tie_weights()` on every transformers model in the tree (no-op when the config does not tie)."""
    for pretrained in _pretrained_models(model):
        pretrained.tie_weights()


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of the buffers that `state_dict` leaves out (rotary `*_inv_freq`)."""
    persistent = set(model.state_dict(keep_vars=True))
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def _load_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of each decoder layer, then ("", model) for what is left."""
    names = {id(m): name for name, m in model.named_modules()}
    return [(names[id(layer)] + ".", layer) for layer in decoder_layers(model)] + [("", model)]


def _materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Allocate every buffer on `device` (values follow); parameters stay on meta."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def _on_meta(module: nn.Module) -> bool:
    """Whether no tensor of `module`'s state dict is allocated yet (0-dim ones aside)."""
    return all(t.is_meta for t in module.state_dict(keep_vars=True).values() if t.dim() > 0)


def load_from_source(model: nn.Module, full_state_dict: dict[str, torch.Tensor], device: torch.device | str) -> None:
    """Send rank 0's full state dict into every rank's shards with DCP (`broadcast_from_rank0`), one decoder layer
    at a time. Rank 0 drops each part of `full_state_dict` once sent (the dict is emptied), so its memory falls as
    the shards fill instead of holding the checkpoint and the shards at once.

    Parameters are expected on meta and buffers on `device` (`_materialize_buffers`): DCP then assigns each received
    shard instead of copying it into an allocated parameter (and, for the root, every loaded parameter into itself),
    and puts the shards on the device of the tensors it finds allocated."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    is_source = dist.get_rank() == 0
    for prefix, module in _load_units(model):
        if _on_meta(module):  # no buffer to take the device from: DCP would use the process group's default device
            module.to_empty(device=device)
        part = {}
        if is_source:
            part = {
                key[len(prefix) :]: full_state_dict.pop(key) for key in list(full_state_dict) if key.startswith(prefix)
            }
        set_model_state_dict(module, part, options=options)
        del part


def broadcast_non_persistent_buffers(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Make the buffers outside the state dict equal to rank 0's (they are recomputed from the config elsewhere)."""
    for name, buffer in _non_persistent_buffers(model).items():
        if dist.get_rank() == 0:
            buffer.copy_(source[name])
        dist.broadcast(buffer, src=0)


def _device() -> torch.device:
    """This rank's compute device: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def _detach_source_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rank 0's (state dict, non-persistent buffers) as references: moving the model to meta copies nothing."""
    if dist.get_rank() != 0:
        return {}, {}
    return dict(model.state_dict()), {n: b for n, b in _non_persistent_buffers(model).items()}


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    mixed_precision: MixedPrecisionPolicy | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard `model` with FSDP2 and fill every shard with rank 0's weights, in place; returns `model`.

    Every rank must call it. Rank 0 must hold real weights; the other ranks may hold the same model on meta
    (`memory_efficient_init`) or real weights (ignored). `mesh` defaults to a 1-D mesh over all ranks on this
    rank's device (GPU under NCCL, else CPU); `mixed_precision` applies to bf16/fp32 groups only, never to
    fp32-kept modules or FP8/integer tensors; `cpu_offload` keeps sharded parameters on the CPU (also on CPU-only
    machines). LoRA factors that peft applies through `target_parameters` (routed experts) are cast to the dtype of
    the weight they adapt first (`hf_dsv4.lora.align_parameter_adapter_dtypes`). Raises `ShardingError` on every
    rank if any rank's model differs from rank 0's.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ShardingError("shard_model needs torch.distributed; start with torchrun or `accelerate launch`")
    device = _device()
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    cast = align_parameter_adapter_dtypes(model)  # before validation: every rank casts the same factors
    if cast:
        logger.info("%d routed-expert LoRA factor(s) kept in the experts' dtype (see hf_dsv4.lora)", cast)
    validate_against_source(model)
    state_dict, buffers = _detach_source_weights(model)
    # Every rank shards a meta model the same way; rank 0's real tensors live on in `state_dict` only.
    model.to("meta")
    _tie_weights(model)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None
    apply_fsdp(model, mesh, reshard_after_forward, mixed_precision, offload)
    _materialize_buffers(model, "cpu" if cpu_offload else device)
    load_from_source(model, state_dict, "cpu" if cpu_offload else device)
    del state_dict
    broadcast_non_persistent_buffers(model, buffers)
    _tie_weights(model)
    logger.info("rank %d: model sharded over %d ranks", dist.get_rank(), dist.get_world_size())
    return model
