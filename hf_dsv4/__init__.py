"""hf_dsv4: fine-tune DeepSeek-V4 with the Hugging Face stack (an add-on to transformers, accelerate, peft, trl).

The layers, in the direction the data flows and imports run (each imports only the ones before it):
`template` (chat format; needs no trl/accelerate/peft) <- `modeling` (sparse attention; transformers only) <-
`loading` (rank-aware from_pretrained) <- `sharding` (FSDP2 layout and fill) <- `training` (trainer, config,
callback, accelerate plugin, data, LoRA, adapters).
`distributed` and `compat` are shared by all but `template`. The names below are exported lazily: importing
`hf_dsv4` (or `hf_dsv4.template`) imports none of trl, accelerate or peft until one of their names is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ChatFormatError": "hf_dsv4.template",
    "encode_messages": "hf_dsv4.template",
    "install_chat_template": "hf_dsv4.template",
    "detect_effort_profile": "hf_dsv4.template",
    "tokenize_conversation": "hf_dsv4.template",
    "CheckpointLoadError": "hf_dsv4.loading",
    "memory_efficient_init": "hf_dsv4.loading",
    "enable_sparse_attention": "hf_dsv4.modeling",
    "ShardingError": "hf_dsv4.sharding",
    "save_pretrained_sharded": "hf_dsv4.sharding",
    "shard_model": "hf_dsv4.sharding",
    "DSV4Accelerator": "hf_dsv4.training",
    "DSV4Callback": "hf_dsv4.training",
    "DSV4FSDP2Plugin": "hf_dsv4.training",
    "DSV4SFTConfig": "hf_dsv4.training",
    "DSV4SFTTrainer": "hf_dsv4.training",
    "LORA_TARGETS": "hf_dsv4.training",
    "dsv4_lora_config": "hf_dsv4.training",
    "dsv4_trainer_accelerator": "hf_dsv4.training",
    "gather_adapter": "hf_dsv4.training",
    "load_adapter": "hf_dsv4.training",
    "save_adapter": "hf_dsv4.training",
    "export_adapter": "hf_dsv4.serving",
    "merge_adapter": "hf_dsv4.serving",
}
__all__ = [
    "ChatFormatError",
    "CheckpointLoadError",
    "DSV4Accelerator",
    "DSV4Callback",
    "DSV4FSDP2Plugin",
    "DSV4SFTConfig",
    "DSV4SFTTrainer",
    "LORA_TARGETS",
    "ShardingError",
    "dsv4_lora_config",
    "dsv4_trainer_accelerator",
    "enable_sparse_attention",
    "encode_messages",
    "export_adapter",
    "gather_adapter",
    "install_chat_template",
    "merge_adapter",
    "detect_effort_profile",
    "load_adapter",
    "memory_efficient_init",
    "save_adapter",
    "save_pretrained_sharded",
    "shard_model",
    "tokenize_conversation",
]

if TYPE_CHECKING:
    from .loading import CheckpointLoadError, memory_efficient_init
    from .modeling import enable_sparse_attention
    from .serving import export_adapter, merge_adapter
    from .sharding import ShardingError, save_pretrained_sharded, shard_model
    from .template import (
        ChatFormatError,
        detect_effort_profile,
        encode_messages,
        install_chat_template,
        tokenize_conversation,
    )
    from .training import (
        LORA_TARGETS,
        DSV4Accelerator,
        DSV4Callback,
        DSV4FSDP2Plugin,
        DSV4SFTConfig,
        DSV4SFTTrainer,
        dsv4_lora_config,
        dsv4_trainer_accelerator,
        gather_adapter,
        load_adapter,
        save_adapter,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_dsv4' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
