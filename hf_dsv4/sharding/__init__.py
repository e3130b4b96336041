"""Sharding: a model on every rank (real on rank 0, meta elsewhere) -> FSDP2 shards filled with rank 0's weights;
quantized-resident frozen weights (`keep_quantized`); and back out: a sharded model written as a Hub checkpoint with no rank holding it whole (`save_pretrained_sharded`)."""

from .. import compat

compat.require("torch", "transformers")

from .export import save_pretrained_sharded  # noqa: E402
from .layout import ShardingError, apply_fsdp, decoder_layers, group_keys  # noqa: E402
from .quantized import QuantizationError, dequantize, quantize_base, quantized_modules  # noqa: E402
from .shard import align_parameter_adapter_dtypes, shard_model  # noqa: E402

__all__ = [
    "QuantizationError",
    "ShardingError",
    "align_parameter_adapter_dtypes",
    "apply_fsdp",
    "decoder_layers",
    "dequantize",
    "group_keys",
    "quantize_base",
    "quantized_modules",
    "save_pretrained_sharded",
    "shard_model",
]
