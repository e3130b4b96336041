"""Training: the sharded model + tokenized rows -> a trained adapter (or model) on disk and on the Hub.

`DSV4SFTTrainer` + `DSV4SFTConfig` (TRL), `DSV4Callback` (any Trainer), the accelerate plugin (`DSV4Accelerator`,
`DSV4FSDP2Plugin`, `dsv4_trainer_accelerator`), dataset rows -> ids and labels (`data`), LoRA presets (`lora`) and
PEFT adapters out of and into FSDP2 shards (`adapter`).
"""

from .. import compat

compat.require("transformers", "transformers.trainer", "accelerate", "trl", "peft")

from .accelerate_plugin import DSV4Accelerator, DSV4FSDP2Plugin, dsv4_trainer_accelerator  # noqa: E402
from .adapter import gather_adapter, load_adapter, save_adapter  # noqa: E402
from .callback import DSV4Callback  # noqa: E402
from .config import DSV4SFTConfig  # noqa: E402
from .lora import LORA_TARGETS, dsv4_lora_config  # noqa: E402
from .trainer import DSV4SFTTrainer  # noqa: E402

__all__ = [
    "LORA_TARGETS",
    "DSV4Accelerator",
    "DSV4Callback",
    "DSV4FSDP2Plugin",
    "DSV4SFTConfig",
    "DSV4SFTTrainer",
    "dsv4_lora_config",
    "dsv4_trainer_accelerator",
    "gather_adapter",
    "load_adapter",
    "save_adapter",
]
