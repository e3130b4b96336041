"""The fence around upstream internals: every private name of torch, transformers, accelerate, trl and peft that
hf_dsv4 overrides, calls, reads or replaces is listed in this package, checked when the layer that uses it is imported,
and (where hf_dsv4 touches it directly) reached only through a function of this package.

`require("trl")` (run by `hf_dsv4.training` at import) fails with `UpstreamCompatError`, naming the package, its
installed version and the versions hf_dsv4 was tested with, if a listed name is gone or its parameters changed; a
version outside the tested range that still has every name only logs a warning. Fence names are packages, or a
package's part that only one layer needs ("transformers.trainer": the Trainer's internals, checked by the training
layer, so that loading and sharding never import the Trainer). The tested ranges are the upper
bounds in setup.cfg. The overrides themselves (`DSV4Accelerator._prepare_fsdp2`, `DSV4SFTTrainer._prepare_dataset`
and the Trainer's checkpoint hooks) live in their subclasses; their upstream signatures are checked here.

One module per upstream package (`torch`, `transformers`, `accelerate`, `peft`, `trl`) holds that package's part of
the fence (its `FENCE`) and the functions that touch its internals. This module holds the check (`Internal`,
`require`) and `FENCE`, every part in one table, and re-exports every function: the layers call them as
`compat.convert_into(...)`. `compat.torch` is the part, not torch (inside it, `import torch` is torch: imports are
absolute).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
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


# The parts import `Internal` and `require` from here, so they are imported once those are defined; every function
# of theirs is re-exported, so the layers call `compat.convert_into(...)` whichever part holds it.
from . import accelerate, peft, torch, transformers, trl  # noqa: E402
from .accelerate import (  # noqa: E402, F401
    parallelism_check_deferred,
    prepare_one,
    register_prepared_model,
    set_process_distributed_type,
)
from .peft import param_wrapper_class  # noqa: E402, F401
from .torch import (  # noqa: E402, F401
    end_of_step,
    fake_store,
    fake_tensor_mode,
    is_fake,
    make_wrapper_subclass,
    memory_tracker,
    subclass_functions_disabled,
    tracker_peak,
    writes_into_arguments,
)
from .transformers import (  # noqa: E402, F401
    READ_IN_THE_CALLING_THREAD,
    checkpoint_module_name,
    convert_into,
    dequantize_blocks,
    dsv4_apply_rotary_pos_emb,
    dsv4_eager_attention_forward,
    eager_experts_config,
    eager_mask,
    from_config,
    from_pretrained_keywords,
    keep_in_fp32_modules,
    mask_function_with_padding,
    model_keys_of,
    no_split_modules,
    revert_weight_conversion,
    sdpa_mask,
    set_weight_conversions,
    trainer_accelerator_class,
    weight_conversions,
    weights_not_read,
)

# fence name (a package, or "package.part") -> (the package's tested versions, the internals hf_dsv4 relies on)
FENCE: dict[str, tuple[str, tuple[Internal, ...]]] = {
    **torch.FENCE, **transformers.FENCE, **accelerate.FENCE, **trl.FENCE, **peft.FENCE,
}  # fmt: skip

require("torch", "transformers")
