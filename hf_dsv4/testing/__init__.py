"""Tiny DeepSeek-V4 artefacts built locally for tests, the demo and benchmarks (nothing is downloaded)."""

from .tokenizer import tiny_tokenizer

__all__ = ["tiny_tokenizer"]

from .model import build_tiny_dsv4, tiny_dsv4_config  # noqa: E402

__all__ += ["build_tiny_dsv4", "tiny_dsv4_config"]
