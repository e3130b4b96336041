"""`DSV4SFTConfig`: TRL's `SFTConfig` with DeepSeek-V4 defaults and the chat-format options of `hf_dsv4.template`.

Secrets (`hub_token`, and any other credential field the stack defines) never leave the process through the config:
its `repr`/`str` mask them as `TrainingArguments.__str__` does (the dataclass-generated `repr` of TRL's `SFTConfig`
prints them), and pickling it (`training_args.bin`, written by the Trainer into the output folder and every checkpoint,
and uploaded by `push_to_hub`) leaves them out. `copy.copy`/`copy.deepcopy` still copy them: the push needs the token.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import SFTConfig

from ..template.tokenization import OVERLONG, TURNS, validate_policies

# A credential field: `*_token` (the stack's naming, e.g. `hub_token`) except the tokenizer's special tokens, which
# TRL also calls `*_token`; or anything named a secret, password or API key.
_CREDENTIAL = re.compile(r"(^|_)(token|secret|password|api_key)$")
_SPECIAL_TOKENS = frozenset(f"{name}_token" for name in ("bos", "eos", "pad", "unk", "sep", "cls", "mask"))


def secret_fields(args: Any) -> list[str]:
    """The names of the credential fields of a config dataclass (`hub_token` for `TrainingArguments` and TRL)."""
    return [f.name for f in dataclasses.fields(args) if _CREDENTIAL.search(f.name) and f.name not in _SPECIAL_TOKENS]


@dataclass
class DSV4SFTConfig(SFTConfig):
    """`trl.SFTConfig` with DeepSeek-V4 defaults and the chat-format options of `hf_dsv4.template`.

    Changed defaults: `assistant_only_loss=True`, `router_aux_loss_coef=0.0` (DeepSeek-V4 balances its experts with
    `e_score_correction_bias`, not an auxiliary loss; TRL's Mixtral-style loss also needs `config.num_experts`, which
    DeepSeek-V4 does not have), activation checkpointing off (`activation_checkpointing=True`, or its alias
    `gradient_checkpointing=True`, for the real model).

    Its arguments are every field below and `trl.SFTConfig`'s, each documented by its `help` metadata (no `Args:`
    list repeats them); the recipe's flags, with that help, are in the generated flags tables of `docs/training.md`.

    Raises:
        ValueError: an unknown `turns` / `overlong` policy; `packing` or `padding_free` without `sparse_attention`;
            `packing_strategy="wrapped"` (it cuts samples across rows).
    """

    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Train only the assistant spans (reasoning, content, tool calls, EOS) of conversational rows."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=0.0,
        metadata={"help": "TRL's MoE load-balancing loss coefficient; 0 for DeepSeek-V4 (bias-balanced routing)."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (TRL turns it on by default; here it is off)."
        },
    )
    stream_weights: bool = field(
        default=True,
        metadata={
            "help": "Under a distributed (FSDP) launch, read a model given by path or hub id into the shards one "
            "decoder layer at a time (memory_efficient_init(stream=True)): no rank holds the whole model, and "
            "DeepSeek's release checkpoints (FP8 / FP4) are dequantized as they stream. A local folder without "
            "safetensors files is loaded whole; false: rank 0 always loads the whole model first, then sends it."
        },
    )
    stream_readers: str = field(
        default="rank0",
        metadata={
            "help": "Who reads a streamed checkpoint: 'rank0' reads each decoder layer on rank 0 and sends it into the "
            "shards; 'all' has every rank read only the rows of its own shards (no weight crosses ranks), for "
            "machines that each see the checkpoint files (a hub id is downloaded once per machine, into its cache).",
            "choices": ["rank0", "all"],
        },
    )
    stream_read_budget_mb: float = field(
        default=0.0,
        metadata={
            "help": "Read a streamed checkpoint in pieces of at most this many MB (once dequantized) instead of whole "
            "decoder layers (DeepSeek-V4-Flash's are ~13 GB in bf16, its fused experts alone 8.6 GB): with "
            "stream_readers 'rank0' rank 0 reads each rank's rows in such pieces and sends them; with 'all' every "
            "rank reads its own rows in such pieces. 0: whole layers."
        },
    )
    keep_quantized: bool = field(
        default=False,
        metadata={
            "help": "LoRA over a quantized-resident base: the weights a release checkpoint stores as FP8 / FP4 stay so "
            "in the FSDP2 shards (all-gathered as bytes, dequantized per layer in forward and again in backward), "
            "~3.5x less memory for the frozen base than bf16. Needs stream_weights, an FSDP launch and a LoRA "
            "adapter (peft_config); full fine-tuning is refused."
        },
    )
    quantized_experts: str = field(
        default="per_expert",
        metadata={
            "help": "With keep_quantized, how the routed experts compute: 'per_expert' dequantizes each expert's "
            "weight when its tokens reach it (transformers' eager experts loop; a layer holds one expert's weight), "
            "'stack' dequantizes the layer's experts into one stack for the model's experts implementation "
            "(grouped_mm; V4-Flash: 12.9 GB per layer in bf16).",
            "choices": ["per_expert", "stack"],
        },
    )
    sparse_attention: bool = field(
        default=True,
        metadata={
            "help": "DeepSeek-V4 attention with memory linear in the sequence length (hf_dsv4.enable_sparse_attention): "
            "the sliding window read blockwise, the indexer's top-k compressed entries gathered per query, the indexer "
            "scored in query chunks; the same numbers as transformers' dense attention (to float rounding). false: "
            "transformers' attention, whose memory grows with the square of the sequence."
        },
    )
    sparse_attention_chunk: int = field(
        default=256,
        metadata={
            "help": "With sparse_attention, queries per block: larger is faster and takes more transient memory."
        },
    )
    turns: str = field(
        default="all",
        metadata={
            "help": "Which assistant turns to train in multi-turn thinking conversations: 'all' (as rendered in the "
            "full conversation), 'last' (only the trailing turn) or 'per_turn' (one sample per turn, reasoning kept).",
            "choices": list(TURNS),
        },
    )
    overlong: str = field(
        default="truncate",
        metadata={"help": "What to do with samples longer than max_length.", "choices": list(OVERLONG)},
    )
    thinking_mode: str = field(
        default="thinking",
        metadata={"help": "DeepSeek-V4 prompt mode: 'thinking' or 'chat'.", "choices": ["thinking", "chat"]},
    )
    drop_thinking: bool = field(
        default=True,
        metadata={"help": "Drop the reasoning of earlier assistant turns, as DeepSeek-V4 does at inference."},
    )
    reasoning_effort: str | None = field(
        default=None,
        metadata={
            "help": "Reasoning effort of the rendered prompts (thinking mode): under effort profile 0424 None, 'high' "
            "or 'max' (only 'max' adds text); under 0731 'low' (also None), 'high' or 'max'."
        },
    )
    effort_profile: str = field(
        default="auto",
        metadata={
            "help": "Which DeepSeek-V4 release's reasoning-effort block to render: '0424' (DeepSeek-V4-Flash / -Pro as "
            "first released), '0731' (DeepSeek-V4-Flash-0731), or 'auto': read from the checkpoint's "
            "encoding/encoding_dsv4.py (parsed, never run; 0424 when it ships none).",
            "choices": ["auto", "0424", "0731"],
        },
    )
    react: bool | None = field(
        default=None,
        metadata={
            "help": "Convert ReAct-style assistant messages (Thought/Action/Observation lines) to native tool calls: "
            "None = per row, when a ReAct keyword line is present; True = always; False = never."
        },
    )

    def _resolve_device_and_precision(self) -> None:
        """Defaults that work on any machine: with no GPU-like accelerator, run on CPU (`use_cpu`); weights loaded in
        float32 (`model_init_kwargs["dtype"]`) compute in float32 unless `bf16`/`fp16` is given; otherwise TRL's
        default (bf16 unless fp16). `precision_given` says whether `bf16`/`fp16` was given: a copy made with a new
        `model_init_kwargs` (`dataclasses.replace(args, model_init_kwargs=..., bf16=None)`) decides again."""
        import torch

        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True
        self.precision_given = self.bf16 is not None or bool(self.fp16)
        if self.bf16 is None:
            dtype = (self.model_init_kwargs or {}).get("dtype", (self.model_init_kwargs or {}).get("torch_dtype"))
            self.bf16 = not self.fp16 and dtype not in ("float32", torch.float32)

    def __repr__(self) -> str:  # credentials masked (TrainingArguments' rule: every `*_token` field)
        return TrainingArguments.__str__(self)

    __str__ = __repr__

    def __getstate__(self) -> dict[str, Any]:
        """What pickling saves (`torch.save(args, "training_args.bin")`): everything but the credentials (None)."""
        state = dict(self.__dict__)
        for name in secret_fields(self):
            state[name] = None
        return state

    def __copy__(self) -> DSV4SFTConfig:
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> DSV4SFTConfig:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def _refuse_inexact_packing(self) -> None:
        """Packed rows are exact per sample only in hf_dsv4's attention, and only when samples stay whole."""
        if (self.packing or self.padding_free) and not self.sparse_attention:
            raise ValueError(
                "packing / padding_free needs sparse_attention=True: hf_dsv4's attention keeps each packed sample to "
                "its own tokens, while transformers' DeepSeek-V4 compressors read the whole row (packed samples "
                "would see each other)"
            )
        if self.packing and self.packing_strategy == "wrapped":
            raise ValueError(
                "packing_strategy='wrapped' cuts samples across rows, so a sample sees the end of another: use "
                "'bfd' (the default; samples whole, each trained as if alone) or 'bfd_split'"
            )

    def __post_init__(self) -> None:
        validate_policies(self.turns, self.overlong)
        self._resolve_device_and_precision()
        self._refuse_inexact_packing()
        super().__post_init__()
