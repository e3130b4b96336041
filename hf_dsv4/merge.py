"""`python -m hf_dsv4.merge BASE ADAPTER_DIR OUT_DIR [--dtype bfloat16]`: a trained DeepSeek-V4 LoRA adapter merged
into its base (Hub or release layout), streamed one decoder layer at a time; see `hf_dsv4.serving.merge`."""

from __future__ import annotations

from .serving.merge import main, merge_adapter

__all__ = ["main", "merge_adapter"]

if __name__ == "__main__":
    main()
