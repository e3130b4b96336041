"""hf_dsv4: fine-tune DeepSeek-V4 with the Hugging Face stack (an add-on to transformers, accelerate, peft, trl)."""

from .accelerate_plugin import DSV4Accelerator, DSV4FSDP2Plugin
from .fsdp import ShardingError, shard_model
from .loading import CheckpointLoadError, memory_efficient_init
from .template import ChatFormatError, encode_messages, install_chat_template, tokenize_conversation

__version__ = "0.1.0"
__all__ = [
    "ChatFormatError",
    "CheckpointLoadError",
    "DSV4Accelerator",
    "DSV4FSDP2Plugin",
    "ShardingError",
    "encode_messages",
    "install_chat_template",
    "memory_efficient_init",
    "shard_model",
    "tokenize_conversation",
]
