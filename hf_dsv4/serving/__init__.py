"""Serving: a trained adapter out to the engines that serve it, above training.

`export_adapter` writes a DeepSeek-V4 LoRA adapter in the form vLLM serves (DeepSeek-native names, routed experts per
expert or fused); `merge_adapter` merges it into its base checkpoint one decoder layer at a time (a bf16 model any
engine serves). Their command lines: `python -m hf_dsv4.export`, `python -m hf_dsv4.merge`.
"""

from .export import export_adapter
from .merge import merge_adapter

__all__ = ["export_adapter", "merge_adapter"]
