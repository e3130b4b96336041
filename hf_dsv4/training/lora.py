"""LoRA for DeepSeek-V4: which projections to adapt, as `peft.LoraConfig`s, and how a new adapter starts
(`draw_lora_factors`, `seeded_lora_init`).

Named target sets (`dsv4_lora_config(targets=...)`), from smallest to largest:

| name | adapted | how |
| --- | --- | --- |
| `"attention"` | `self_attn.q_a_proj, q_b_proj, kv_proj, o_b_proj` of every layer | `target_modules` (regex) |
| `"attention+shared"` | + `mlp.shared_experts.gate_proj, up_proj, down_proj` | `target_modules` (regex) |
| `"all"` | + routed experts `mlp.experts.gate_up_proj, down_proj` | + `target_parameters` |

Choices, and why:

- The compressor and lightning-indexer projections inside CSA/HCA attention (`self_attn.compressor.kv_proj`,
  `...compressor.gate_proj`, `...indexer.*`) share names with the attention projections but are never adapted: the
  indexer only picks which compressed entries to attend (a top-k, so the LM loss gives it no gradient) and the
  compressor summarises the raw token stream that the sparse attention reads, so a low-rank update there shifts every
  later query's view of the context. The regexes anchor on `self_attn.<name>` to leave them out.
- `self_attn.o_a_proj` is a block-diagonal grouped projection (`DeepseekV4GroupedLinear`, an `nn.Linear` subclass that
  reshapes its input per group); a plain LoRA on it would compute the wrong shape, so it is never targeted.
- Routed experts are fused 3-D parameters; peft adapts them through `target_parameters` (one rank-`r` update per
  expert, `r x num_experts` rows in `lora_A`). On V4-Flash (256 experts) that is most of the adapter: use it only
  when the attention + shared-expert adapter is not enough.
- Routers, hyper-connections, norms, sinks and embeddings are not adapted (they are small, and several are kept in
  fp32 by the model).
- Adapter weights are created in fp32 (peft's default `autocast_adapter_dtype=True`) beside a bf16 base. FSDP2
  accepts that because `hf_dsv4.shard_model` puts each dtype in its own FSDP group; a bf16 `MixedPrecisionPolicy`
  still computes them in bf16, with fp32 master weights and fp32 gradient reduction. The one exception, routed-expert
  factors, which must share the decoder layer's group, is handled by
  `hf_dsv4.sharding.align_parameter_adapter_dtypes` (called by `shard_model`).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from ..sharding.streamed import lora_layers

ATTENTION = r".*\.self_attn\.(q_a_proj|q_b_proj|kv_proj|o_b_proj)"
SHARED_EXPERTS = r".*\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)"
ROUTED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# name -> (target_modules regex, target_parameters)
LORA_TARGETS: dict[str, tuple[str, list[str] | None]] = {
    "attention": (ATTENTION, None),
    "attention+shared": (f"{ATTENTION}|{SHARED_EXPERTS}", None),
    "all": (f"{ATTENTION}|{SHARED_EXPERTS}", ROUTED_EXPERTS),
}


def resolve_lora_targets(targets: str | Sequence[str] | None) -> tuple[str | list[str], list[str] | None]:
    """`(target_modules, target_parameters)` for a preset name, or for explicit module names (kept as given).

    `None` means the `"attention"` preset. A one-element list holding a preset name (what a CLI flag such as
    `--lora_target_modules attention+shared` gives) counts as that preset.
    """
    if targets is None:
        targets = "attention"
    if not isinstance(targets, str) and len(targets) == 1 and targets[0] in LORA_TARGETS:
        targets = targets[0]
    if isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise ValueError(
                f"unknown LoRA target preset {targets!r}: use one of {sorted(LORA_TARGETS)} or a list of module names"
            )
        modules, parameters = LORA_TARGETS[targets]
        return modules, (list(parameters) if parameters else None)
    grouped = [t for t in targets if t == "o_a_proj" or t.endswith(".o_a_proj")]  # peft matches name suffixes
    if grouped:
        raise ValueError(
            f"{grouped[0]!r}: o_a_proj is a grouped (block-diagonal) projection that LoRA cannot adapt: remove it"
        )
    return list(targets), None


def dsv4_lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    targets: str | Sequence[str] | None = "attention",
    **kwargs: Any,
) -> LoraConfig:
    """A causal-LM `LoraConfig` for DeepSeek-V4 with one of the `LORA_TARGETS` presets (or explicit module names).

    Args:
        r: the LoRA rank.
        alpha: `lora_alpha` (the update is scaled by alpha / r).
        dropout: `lora_dropout`.
        targets: a preset of `LORA_TARGETS` ("attention", "attention+shared", "all"), or module names.
        **kwargs: more `LoraConfig` fields (e.g. `use_rslora=True`); a `target_parameters` given here is added to the
            preset's (routed experts are adapted through `target_parameters`).

    Returns:
        `peft.LoraConfig` with `task_type="CAUSAL_LM"`.

    Raises:
        ValueError: an unknown preset name.
    """
    modules, parameters = resolve_lora_targets(targets)
    extra = kwargs.pop("target_parameters", None)
    if extra:
        parameters = [*(parameters or []), *extra]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        target_parameters=parameters,
        task_type="CAUSAL_LM",
        **kwargs,
    )


@torch.no_grad()
def draw_lora_factors(model: nn.Module, seed: int, allocate: bool = False) -> int:
    """Draw every LoRA factor pair of a PeftModel as peft initialises it, from `seed` and the layer's name.

    `init_lora_weights` True: A kaiming-uniform with a = sqrt(5); "gaussian": A normal with std 1/r; B zero; each pair
    from its own generator seeded by `seed` and the layer's name: the same adapter whatever the number of ranks, the
    order of creation or whether the base was loaded streamed. Adapters with another init are left as peft made them.

    Args:
        model: the PeftModel.
        seed: the seed (`DSV4SFTTrainer` uses `args.seed`).
        allocate: factors on meta (a streamed base) are allocated on CPU and drawn too; else they are left alone.

    Returns:
        The number of pairs drawn.
    """
    drawn = 0
    for name, module, adapter, init in lora_layers(model):
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if init not in (True, "gaussian") or (a.weight.is_meta and not allocate):
            continue
        if a.weight.is_meta:
            a.to_empty(device="cpu")
            b.to_empty(device="cpu")
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{adapter}".encode())) % 2**63)
        if init is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a.weight, std=1 / module.r[adapter], generator=generator)
        nn.init.zeros_(b.weight)
        if getattr(b, "bias", None) is not None:
            nn.init.zeros_(b.bias)
        drawn += 1
    return drawn


def seeded_lora_init(seed: int) -> Callable[[nn.Module], int]:
    """The adapter initializer `shard_model(..., init_adapter=...)` takes for a streamed base: `draw_lora_factors`
    with `seed`, factors on meta allocated on CPU first (the same values on every rank)."""
    return functools.partial(draw_lora_factors, seed=seed, allocate=True)
