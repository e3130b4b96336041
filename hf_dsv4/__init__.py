"""hf_dsv4: fine-tune DeepSeek-V4 with the Hugging Face stack."""

from .template import ChatFormatError, encode_messages

__version__ = "0.1.0"
__all__ = ["ChatFormatError", "encode_messages"]

from .fsdp import ShardingError, shard_model  # noqa: E402
from .loading import CheckpointLoadError, memory_efficient_init  # noqa: E402

__all__ += ["CheckpointLoadError", "ShardingError", "memory_efficient_init", "shard_model"]

from .accelerate_plugin import DSV4Accelerator, DSV4FSDP2Plugin  # noqa: E402

__all__ += ["DSV4Accelerator", "DSV4FSDP2Plugin"]
