"""A DeepSeek-V4 LoRA adapter in the form a serving engine loads: DeepSeek-native module names, routed experts per
expert (vLLM's native DeepSeek-V4 LoRA format).

An adapter trained here is a PEFT adapter of the Hugging Face model (`model.layers.N.self_attn.q_a_proj`, the routed
experts fused in `mlp.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` through peft's `target_parameters`).
vLLM maps DeepSeek-V4 LoRA weights by the checkpoint's own names (`layers.N.attn.wq_a`, `layers.N.ffn.experts.E.w1`)
and refuses the Hugging Face ones. `export_adapter` renames every module with the reverse of transformers' own
`deepseek_v4` conversion mapping (`compat.checkpoint_module_name`, no second table) and splits the fused expert
factors: peft stores `lora_A` expert-major (`[E*r, in]`: rows e*r..(e+1)*r are expert e's) and `lora_B` rank-major
(`[out, E*r]` viewed as `[out, r, E]`: column block [:, :, e] is expert e's); gate is the first half of `2I`. Each
exported pair's `B @ A * scaling` equals, bit for bit, the slice of peft's own delta for that module (tested).

`format="vllm-3d"` keeps the routed experts fused, in peft's layout (the one vLLM reads with
`enable_mixed_moe_lora_format=True` and a `LoRARequest(..., is_3d_lora_weight=True)`): `layers.N.ffn.experts.base_layer`
holds gate_up (`lora_A [E*r, H]`, `lora_B [2I, E*r]`, gate the first half of 2I) and `layers.N.ffn.experts` holds down
(`lora_A [E*r, I]`, `lora_B [H, E*r]`), whatever order peft wrapped them in; a layer that adapts only one of the two
gets zero factors for the other (a zero update), since vLLM reads the pair by position; likewise "vllm" writes zero
w2 (or w1 and w3) factors for every expert of such a layer: vLLM's per-expert packer asserts all three are present.

    python -m hf_dsv4.export ADAPTER_DIR OUT_DIR [--format vllm|vllm-3d]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import compat
from ..training.adapter import adapter_folder

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
FORMATS = ("vllm", "vllm-3d")
FUSED = {"gate_up_proj": ".base_layer", "down_proj": ""}  # vllm-3d: where each fused expert parameter goes
# adapted modules vLLM loads but does not apply for DeepSeek-V4 (its grouped output projection, the compressors)
IGNORED_BY_VLLM = (".wo_a", ".compressor.")


def _expert_kinds(
    module: str, by_depth: dict[int, tuple[torch.Tensor, torch.Tensor]], listed: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Which fused expert parameter each of `module`'s peft wrappers (by `base_layer` depth) adapts. The adapter does
    not record it and peft's nesting order is its own (0.21: the module's parameter order, whatever order
    `target_parameters` lists them in), so: one adapted parameter is the one listed; gate_up_proj and down_proj are told
    apart by their shapes (gate_up: A `[E*r, H]`, B `[2I, E*r]`; down: A `[E*r, I]`, B `[H, E*r]`: one way only fits)."""
    if sorted(by_depth) != list(range(len(listed))):
        raise ValueError(f"{module}: {len(by_depth)} LoRA pair(s) for target_parameters {listed}")
    if len(listed) == 1:
        return {listed[0]: by_depth[0]}
    if sorted(listed) != ["down_proj", "gate_up_proj"]:
        raise ValueError(f"{module}: unknown routed-expert parameters {listed}")
    for gate_up, down in ((by_depth[0], by_depth[1]), (by_depth[1], by_depth[0])):
        if gate_up[1].shape[0] == 2 * down[0].shape[1] and down[1].shape[0] == gate_up[0].shape[1]:
            return {"gate_up_proj": gate_up, "down_proj": down}
    shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in by_depth.values()]
    raise ValueError(f"{module}: LoRA shapes {shapes} fit no gate_up_proj [2I, H] / down_proj [H, I] pair")


def _experts_of(module: str, a: torch.Tensor, b: torch.Tensor, r: int) -> int:
    """The expert count of a fused expert adapter (`lora_A [E*r, in]`, `lora_B [out, E*r]`), checked."""
    experts = a.shape[0] // r
    if a.shape[0] != experts * r or b.shape[1] != experts * r:
        raise ValueError(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not {r}-rank per expert")
    return experts


def _split_experts(
    module: str, kind: str, a: torch.Tensor, b: torch.Tensor, r: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-expert (A, B) of a fused expert adapter: `kind` "gate_up_proj" gives w1 (gate, first half of 2I) and w3
    (up); "down_proj" gives w2. `module` is the native experts module (`layers.N.ffn.experts`)."""
    experts = _experts_of(module, a, b, r)
    by_expert = b.reshape(b.shape[0], r, experts)  # rank-major
    out = {}
    for e in range(experts):
        a_e, b_e = a[e * r : (e + 1) * r].contiguous(), by_expert[:, :, e].contiguous()
        if kind == "gate_up_proj":
            half = b_e.shape[0] // 2
            out[f"{module}.{e}.w1"] = (a_e, b_e[:half].contiguous())
            out[f"{module}.{e}.w3"] = (a_e.clone(), b_e[half:].contiguous())
        elif kind == "down_proj":
            out[f"{module}.{e}.w2"] = (a_e, b_e)
        else:
            raise ValueError(f"{module}: unknown routed-expert parameter {kind!r}")
    return out


def _both_of_each_pair(
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], r: int
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each native experts module's fused factors by kind, a missing one of the pair as zeros of its shape (gate_up
    `[E*r, H]` / `[2I, E*r]` <-> down `[E*r, I]` / `[H, E*r]`): vLLM reads gate_up and down as a pair (vllm-3d) and
    its per-expert packer asserts w1, w2 and w3 are all present (vllm); a zero pair is a zero update."""
    out = {}
    for module, kinds in fused.items():
        kinds = dict(kinds)
        for kind, (a, b) in kinds.items():
            if kind not in FUSED:
                raise ValueError(f"{module}: unknown routed-expert parameter {kind!r}")
            _experts_of(module, a, b, r)
        if len(kinds) == 1:
            ((kind, (a, b)),) = kinds.items()
            if kind == "gate_up_proj":  # down: [E*r, I] / [H, E*r]
                missing, shapes = "down_proj", ((a.shape[0], b.shape[0] // 2), (a.shape[1], b.shape[1]))
            else:  # gate_up: [E*r, H] / [2I, E*r]
                missing, shapes = "gate_up_proj", ((a.shape[0], b.shape[0]), (2 * a.shape[1], b.shape[1]))
            kinds[missing] = (a.new_zeros(shapes[0]), b.new_zeros(shapes[1]))
            logger.info("%s: %s is not adapted; written as zero factors (vLLM reads gate_up and down together)",
                        module, missing)  # fmt: skip
        out[module] = kinds
    return out


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, format: str = "vllm") -> Path:
    """Write a PEFT LoRA adapter in the form a serving engine loads (see the module docstring).

    Other files of the adapter (tokenizer, chat template, model card) are copied along; the written
    `adapter_config.json` has leaf-name `target_modules` and no `target_parameters`.

    Args:
        adapter_dir: a PEFT adapter folder saved by the recipe / `DSV4SFTTrainer`.
        out_dir: where to write the exported adapter (created if missing).
        format: "vllm" (DeepSeek-native names, routed experts split per expert) or "vllm-3d" (the same names, routed
            experts kept fused).

    Returns:
        `out_dir`, as a `Path`.

    Raises:
        ValueError: an unknown `format`; an adapter that is not LoRA, has `rank_pattern`, `alpha_pattern` or
            `modules_to_save`, or holds tensors that are not LoRA factor pairs of known shapes.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    adapter_dir, out_dir = adapter_folder(adapter_dir), Path(out_dir)
    config, pairs = _read_adapter(adapter_dir)
    modules, experts = _native_modules(adapter_dir, pairs)
    listed = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in config.get("target_parameters") or []))
    exported = modules | _native_experts(adapter_dir, experts, listed, config["r"], format)
    ignored = sorted(n for n in exported if any(part in n for part in IGNORED_BY_VLLM))
    if ignored:
        logger.warning("vLLM loads but does not apply LoRA on %d module(s), e.g. %s", len(ignored), ignored[0])
    _write_adapter(adapter_dir, out_dir, config, exported)
    logger.info("exported %d LoRA modules of %s for %s to %s", len(exported), adapter_dir, format, out_dir)
    return out_dir


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """The adapter's config, checked for what the export supports, and its factors by HF module ("A"/"B")."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: a LoRA adapter is needed, got peft_type {config.get('peft_type')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}: {key} is not supported by the export (one rank and alpha for all)")
    if config.get("modules_to_save"):
        raise ValueError(f"{adapter_dir}: modules_to_save (full copies of base modules) cannot be served as LoRA")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or factor not in ("A.weight", "B.weight"):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} (not a LoRA factor of a PEFT adapter)")
        pairs.setdefault(module, {})[factor[0]] = tensor
    return config, pairs


def _native_modules(
    adapter_dir: Path, pairs: dict[str, dict[str, torch.Tensor]]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]]:
    """(A, B) of every module but the routed experts under its checkpoint name; the experts' pairs by HF experts
    module and peft wrapper depth, left for `_native_experts`."""
    exported: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # HF experts module -> wrapper depth
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {module} has lora_{''.join(factors)} only")
        base = module.replace(".base_layer", "")
        if base.endswith(".experts"):
            experts.setdefault(base, {})[module.split(".").count("base_layer")] = (factors["A"], factors["B"])
        else:
            native = compat.checkpoint_module_name("deepseek_v4", f"{base}.weight").removesuffix(".weight")
            exported[native] = (factors["A"], factors["B"])
    return exported, experts


def _native_experts(
    adapter_dir: Path,
    experts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]],
    listed: list[str],
    r: int,
    format: str,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The routed experts' (A, B) under checkpoint names: fused ("vllm-3d") or split per expert ("vllm"), a missing
    one of gate_up / down as zero factors."""
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # native experts module -> kind -> (A, B)
    for base, by_depth in experts.items():
        for kind, (a, b) in _expert_kinds(f"{adapter_dir}: {base}", by_depth, listed).items():
            native = compat.checkpoint_module_name("deepseek_v4", f"{base}.{kind}").removesuffix(f".{kind}")
            fused.setdefault(native, {})[kind] = (a, b)
    exported: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for native, kinds in _both_of_each_pair(fused, r).items():
        for kind, (a, b) in kinds.items():
            if format == "vllm-3d":
                exported[native + FUSED[kind]] = (a, b)
            else:
                exported |= _split_experts(native, kind, a, b, r)
    return exported


def _write_adapter(
    adapter_dir: Path, out_dir: Path, config: dict, exported: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """The exported factors, the adapter's other files and its config (leaf-name `target_modules`) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for native, (a, b) in exported.items():
        out[f"{PEFT_PREFIX}{native}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{native}.lora_B.weight"] = b
    save_file(out, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    for other in adapter_dir.iterdir():
        if other.is_file() and other.name not in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(other, out_dir / other.name)
    leaves = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n in exported})
    config = {**config, "target_modules": leaves, "target_parameters": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    """The command line `python -m hf_dsv4.export ADAPTER_DIR OUT_DIR [--format vllm|vllm-3d]`; prints the folder.

    Args:
        argv: the arguments (None: `sys.argv[1:]`).
    """
    parser = argparse.ArgumentParser(prog="python -m hf_dsv4.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a PEFT adapter saved by the recipe / DSV4SFTTrainer")
    parser.add_argument("out_dir", help="where to write the exported adapter")
    parser.add_argument(
        "--format",
        default="vllm",
        choices=FORMATS,
        help="vllm: DeepSeek-native names, routed experts split per expert; vllm-3d: routed experts kept fused "
        "(serve with enable_mixed_moe_lora_format and LoRARequest(..., is_3d_lora_weight=True))",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(export_adapter(args.adapter_dir, args.out_dir, args.format))
