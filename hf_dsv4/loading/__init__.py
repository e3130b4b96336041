"""Loading: checkpoint files -> a model on every rank, read by the source rank only (`memory_efficient_init`)."""

from .. import compat

compat.require("torch", "transformers")

from .pretrained import CheckpointLoadError, build_on_meta, memory_efficient_init, resolve_dtype  # noqa: E402

__all__ = ["CheckpointLoadError", "build_on_meta", "memory_efficient_init", "resolve_dtype"]
