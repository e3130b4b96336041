"""Every checkpoint layout the loading tests run over: `hf_dsv4.testing.layouts` (DeepSeek's native names and
release, transformers' save_pretrained, a Hugging Face cache snapshot) plus our own merge (`merge_adapter` of a LoRA
adapter saved by peft into the native layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_dsv4.testing.layouts import LAYOUTS, build_layout

ALL_LAYOUTS = (*LAYOUTS, "merged")


def build_merged(path: Path, seed: int = 0) -> Path:
    """`merge_adapter` of a LoRA adapter (every target, random non-zero B, saved by peft) into the native layout."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_dsv4 import dsv4_lora_config, merge_adapter

    native = build_layout("native", path.parent / f"{path.name}_source", seed=seed)
    model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
    peft_model = get_peft_model(model, dsv4_lora_config(r=4, alpha=8, targets="all"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = path.parent / f"{path.name}_adapter"
    peft_model.save_pretrained(adapter)
    return merge_adapter(native, adapter, path)


def build_checkpoint(layout: str, path: Path) -> Path:
    """The tiny DeepSeek-V4 in `layout` (one of `ALL_LAYOUTS`) under `path`; returns the folder to load from."""
    return build_merged(path) if layout == "merged" else build_layout(layout, path)
