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

    python -m hf_dsv4.export ADAPTER_DIR OUT_DIR [--format vllm]
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

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
FORMATS = ("vllm",)
# adapted modules vLLM loads but does not apply for DeepSeek-V4 (its grouped output projection, the compressors)
IGNORED_BY_VLLM = (".wo_a", ".compressor.")


def _wrapped_parameters(config: dict) -> list[str]:
    """The fused expert parameters of a `target_parameters` adapter, outermost wrapper first: peft wraps them in the
    listed order, each around the previous one, so the last listed is the outer one (no `base_layer` in its keys)."""
    return [name.rsplit(".", 1)[-1] for name in reversed(config.get("target_parameters") or [])]


def _split_experts(
    module: str, kind: str, a: torch.Tensor, b: torch.Tensor, r: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-expert (A, B) of a fused expert adapter: `kind` "gate_up_proj" gives w1 (gate, first half of 2I) and w3
    (up); "down_proj" gives w2. `module` is the native experts module (`layers.N.ffn.experts`)."""
    experts = a.shape[0] // r
    if a.shape[0] != experts * r or b.shape[1] != experts * r:
        raise ValueError(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not {r}-rank per expert")
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


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, format: str = "vllm") -> Path:
    """Write the PEFT adapter in `adapter_dir` to `out_dir` in `format` ("vllm": DeepSeek-native names, routed experts
    split per expert, `adapter_config.json` with leaf-name `target_modules` and no `target_parameters`); returns
    `out_dir`. Other files of the adapter (tokenizer, chat template, model card) are copied along."""
    if format not in FORMATS:
        raise ValueError(
            f"format must be one of {FORMATS}, got {format!r} (vLLM's fused 3-D expert format is not written yet)"
        )
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: a LoRA adapter is needed, got peft_type {config.get('peft_type')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}: {key} is not supported by the export (one rank and alpha for all)")
    if config.get("modules_to_save"):
        raise ValueError(f"{adapter_dir}: modules_to_save (full copies of base modules) cannot be served as LoRA")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    wrapped = _wrapped_parameters(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or factor not in ("A.weight", "B.weight"):
            raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} (not a LoRA factor of a PEFT adapter)")
        pairs.setdefault(module, {})[factor[0]] = tensor
    exported: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {module} has lora_{''.join(factors)} only")
        depth = module.split(".").count("base_layer")
        base = module.replace(".base_layer", "")
        if base.endswith(".experts"):
            if depth >= len(wrapped):
                raise ValueError(f"{adapter_dir}: {module} is not one of target_parameters {wrapped}")
            kind = wrapped[depth]
            native = compat.checkpoint_module_name("deepseek_v4", f"{base}.{kind}").removesuffix(f".{kind}")
            exported |= _split_experts(native, kind, factors["A"], factors["B"], config["r"])
        else:
            native = compat.checkpoint_module_name("deepseek_v4", f"{base}.weight").removesuffix(".weight")
            exported[native] = (factors["A"], factors["B"])
    ignored = sorted(n for n in exported if any(part in n for part in IGNORED_BY_VLLM))
    if ignored:
        logger.warning("vLLM loads but does not apply LoRA on %d module(s), e.g. %s", len(ignored), ignored[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for native, (a, b) in exported.items():
        out[f"{PEFT_PREFIX}{native}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{native}.lora_B.weight"] = b
    save_file(out, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    for other in adapter_dir.iterdir():
        if other.is_file() and other.name not in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(other, out_dir / other.name)
    config = {**config, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in exported}), "target_parameters": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("exported %d LoRA modules of %s for %s to %s", len(exported), adapter_dir, format, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_dsv4.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a PEFT adapter saved by the recipe / DSV4SFTTrainer")
    parser.add_argument("out_dir", help="where to write the exported adapter")
    parser.add_argument("--format", default="vllm", choices=FORMATS, help="vllm: DeepSeek-native names, experts split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(export_adapter(args.adapter_dir, args.out_dir, args.format))
