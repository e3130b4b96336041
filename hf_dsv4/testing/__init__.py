"""Tiny DeepSeek-V4 artefacts built locally for tests, the demo and benchmarks (nothing is downloaded)."""

from .tokenizer import deepseek_v4_tokenizer, tiny_tokenizer

__all__ = ["deepseek_v4_tokenizer", "tiny_tokenizer"]

from .model import build_tiny_dsv4, tiny_dsv4_config  # noqa: E402

__all__ += ["build_tiny_dsv4", "tiny_dsv4_config"]

from .release import build_release_dsv4, release_reference_state_dict  # noqa: E402

__all__ += ["build_release_dsv4", "release_reference_state_dict"]
