"""hf_dsv4: fine-tune DeepSeek-V4 with the Hugging Face stack (an add-on to transformers, accelerate, peft, trl)."""

from .accelerate_plugin import DSV4Accelerator, DSV4FSDP2Plugin, dsv4_trainer_accelerator
from .adapter import gather_adapter, load_adapter, save_adapter
from .callback import DSV4Callback
from .fsdp import ShardingError, shard_model
from .loading import CheckpointLoadError, memory_efficient_init
from .lora import LORA_TARGETS, dsv4_lora_config
from .template import ChatFormatError, encode_messages, install_chat_template, tokenize_conversation
from .trainer import DSV4SFTConfig, DSV4SFTTrainer

__version__ = "0.1.0"
__all__ = [
    "LORA_TARGETS",
    "ChatFormatError",
    "CheckpointLoadError",
    "DSV4Accelerator",
    "DSV4Callback",
    "DSV4FSDP2Plugin",
    "DSV4SFTConfig",
    "DSV4SFTTrainer",
    "ShardingError",
    "dsv4_lora_config",
    "dsv4_trainer_accelerator",
    "encode_messages",
    "gather_adapter",
    "install_chat_template",
    "load_adapter",
    "memory_efficient_init",
    "save_adapter",
    "shard_model",
    "tokenize_conversation",
]
