"""The FSDP2 layout of DeepSeek-V4: one group per decoder layer and parameter dtype (torchtitan's `apply_fsdp`).

DeepSeek-V4 keeps hyper-connections, sinks, position biases and norms in fp32 inside bf16 layers, and FSDP2 allows
one original dtype per group, so inside each decoder layer the modules of another dtype become groups of their own
(nested groups first). fp32-kept modules and FP8/integer tensors are never cast by a `MixedPrecisionPolicy`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from .. import compat
from ..loading.units import decoder_layers, pretrained_models

# (dtype, keep): parameters of one FSDP group share both. `keep` = compute in the stored dtype, whatever the
# mixed-precision policy (fp32-kept modules, FP8 and integer tensors).
GroupKey = tuple[torch.dtype, bool]
_CASTABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ShardingError(RuntimeError):
    """The model cannot be sharded, or differs on some rank from rank 0's; raised with the same message on every
    rank."""


# ----------------------------------------------------------------------------------------------- model inspection


def _keep_fp32_pattern(model: nn.Module) -> re.Pattern | None:
    """A regex that matches the names of parameters in `_keep_in_fp32_modules_strict` modules."""
    keys = {k for m in pretrained_models(model) for k in compat.keep_in_fp32_modules(m)}
    if not keys:
        return None
    return re.compile(r"(^|\.)(" + "|".join(map(re.escape, sorted(keys))) + r")(\.|$)")


def group_keys(model: nn.Module) -> dict[nn.Parameter, GroupKey]:
    """The FSDP group key of every parameter: its dtype, and whether it must be computed in that dtype. A
    quantized-resident weight (`hf_dsv4.sharding.quantized.QuantizedWeight`) has the shape and dtype of the weight
    it stands for, so the groups are those of the dequantized model (FSDP2 all-gathers its bytes).

    Args:
        model: the model before `fully_shard`.

    Returns:
        `(dtype, keep)` by parameter: `keep` when the parameter must be computed in its own dtype (fp32-kept modules,
        non-floating dtypes).
    """
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


# ------------------------------------------------------------------------------------------------- groups


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
    """`fully_shard` each decoder layer, then what is left (embeddings, head, final norms), then the root; one FSDP
    group per dtype group (`group_keys`) in each. The model is changed in place.

    Args:
        model: the transformers model (or a module holding one), on meta or real tensors.
        mesh: the 1-D device mesh to shard over.
        reshard_after_forward: free each decoder layer's gathered parameters after its forward (the root's are kept).
        mixed_precision: the policy for castable groups; fp32-kept modules always compute in fp32.
        offload_policy: e.g. `CPUOffloadPolicy`; none by default.

    Raises:
        ShardingError: no decoder layer found (no `_no_split_modules` match).
    """
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
