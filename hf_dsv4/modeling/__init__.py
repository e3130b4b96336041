"""Model-facing parts: DeepSeek-V4 attention with memory linear in the sequence length (`enable_sparse_attention`),
exact per sample over packed rows (`packed_samples`), and split across ranks (`enable_context_parallel`). Needs
transformers and torch only."""

from .context_parallel import ContextParallel, chunk_bounds, chunk_inputs, enable_context_parallel
from .sparse_attention import (
    IMPLEMENTATION,
    SparseAttentionError,
    SparseLayer,
    SparseMask,
    enable_sparse_attention,
    packed_samples,
    sparse_attention_enabled,
    sparse_layer,
)

__all__ = [
    "IMPLEMENTATION",
    "ContextParallel",
    "SparseAttentionError",
    "SparseLayer",
    "SparseMask",
    "chunk_bounds",
    "chunk_inputs",
    "enable_context_parallel",
    "enable_sparse_attention",
    "packed_samples",
    "sparse_attention_enabled",
    "sparse_layer",
]
