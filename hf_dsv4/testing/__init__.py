"""Tiny DeepSeek-V4 artefacts built locally for tests, the demo and benchmarks (nothing is downloaded)."""

from .tokenizer import tiny_tokenizer

__all__ = ["tiny_tokenizer"]
