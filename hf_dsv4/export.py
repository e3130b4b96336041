"""`python -m hf_dsv4.export ADAPTER_DIR OUT_DIR [--format vllm|vllm-3d]`: a trained DeepSeek-V4 LoRA adapter in the
form vLLM serves (DeepSeek-native names, routed experts per expert, or kept fused for vLLM's 3-D MoE LoRA format); see
`hf_dsv4.serving.export`."""

from __future__ import annotations

from .serving.export import export_adapter, main

__all__ = ["export_adapter", "main"]

if __name__ == "__main__":
    main()
