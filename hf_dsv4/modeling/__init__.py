"""Model-facing parts: DeepSeek-V4 attention with memory linear in the sequence length (`enable_sparse_attention`).
Needs transformers and torch only."""

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
    "packed_samples",
    "IMPLEMENTATION",
    "SparseAttentionError",
    "SparseLayer",
    "SparseMask",
    "enable_sparse_attention",
    "sparse_attention_enabled",
    "sparse_layer",
]
