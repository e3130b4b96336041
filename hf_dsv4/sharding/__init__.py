"""Sharding: a model on every rank (real on rank 0, meta elsewhere) -> FSDP2 shards filled with rank 0's weights."""

from .. import compat

compat.require("torch", "transformers")

from .layout import ShardingError, apply_fsdp, decoder_layers, group_keys  # noqa: E402
from .shard import align_parameter_adapter_dtypes, shard_model  # noqa: E402

__all__ = [
    "ShardingError",
    "align_parameter_adapter_dtypes",
    "apply_fsdp",
    "decoder_layers",
    "group_keys",
    "shard_model",
]
