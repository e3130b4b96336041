"""`DSV4SFTTrainer`: TRL's `SFTTrainer` for DeepSeek-V4 under FSDP2, and its config `DSV4SFTConfig`.

What it adds to `SFTTrainer` (the user writes none of it):

- model from a path or hub id: loaded under `memory_efficient_init(stream=args.stream_weights)` (default: every rank
  builds on meta and rank 0 streams the checkpoint into the shards one decoder layer at a time; without streaming,
  rank 0 loads it whole on CPU first), in the configured dtype (`model_init_kwargs["dtype"]`, default bf16), never
  with a `device_map`; LoRA from `peft_config` (see `hf_dsv4.dsv4_lora_config`) is added by `SFTTrainer` as usual,
  its factors drawn per layer from `args.seed` (`hf_dsv4.training.lora.draw_lora_factors`: the same start on any
  number of ranks; on a streamed base the accelerator draws them when it shards, `seeded_lora_init`);
- the DeepSeek-V4 chat template installed on the tokenizer, and the data tokenized by `hf_dsv4.training.data` (messages +
  tools, prompt-completion, ReAct agent rows) with assistant-only labels and the multi-turn thinking policy of
  `turns`; with `packing` (TRL's BFD packing into `max_length` rows) or `padding_free`, rows of several samples,
  each trained exactly as if alone (`enable_sparse_attention` keeps a sample's window, compressed entries and
  indexer picks to its own tokens);
- an accelerator that shards with `hf_dsv4.shard_model` under an FSDP launch config (`DSV4Accelerator`, also on CPU
  processes) and a `DSV4Callback` for throughput / memory / routing-load logs;
- checkpoints that follow the launch config's `fsdp_state_dict_type` (`hf_dsv4.training.checkpoint`): with
  `SHARDED_STATE_DICT` every rank writes its shards of the optimizer state (and, for full fine-tuning, of the model)
  with torch DCP and nothing is gathered; with `FULL_STATE_DICT` they are gathered on rank 0. LoRA checkpoints never
  hold the frozen base: the adapter is written in PEFT format (`adapter_model.safetensors` + `adapter_config.json`,
  gathered with only trainable tensors on the wire, written atomically). `resume_from_checkpoint` (a path, or
  true/latest: the newest complete checkpoint) resumes LoRA and full fine-tuning from either layout;
- `save_model()` writes the adapter (or, for full fine-tuning, a Hub-loadable model: under `SHARDED_STATE_DICT` each
  rank writes its share of the safetensors files, `hf_dsv4.save_pretrained_sharded`) + tokenizer; `push_to_hub()`
  uploads that folder with a model card.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational, pack_dataset

from ..distributed import all_gather_object, every_rank_raises, rank
from ..loading import memory_efficient_init, resolve_dtype
from ..modeling import chunk_inputs, enable_sparse_attention
from ..sharding import save_pretrained_sharded
from ..template import ChatFormatError, ConversationTokenizer, detect_effort_profile, install_chat_template
from .accelerate_plugin import DSV4FSDP2Plugin, dsv4_trainer_accelerator
from .adapter import load_adapter, peft_model_of, save_adapter
from .callback import DSV4Callback
from .checkpoint import (
    FULL,
    load_model,
    load_optimizer,
    save_full_model,
    save_full_optimizer,
    save_sharded_model,
    save_sharded_optimizer,
    state_dict_mode,
)
from .config import DSV4SFTConfig
from .data import SFTRowTokenizer, tokenize_dataset
from .lora import draw_lora_factors, seeded_lora_init
from .model_card import model_card

logger = logging.getLogger(__name__)

# `resume_from_checkpoint` values (case-insensitive strings from the CLI, or True) that mean "the newest complete one"
RESUME_LATEST = frozenset({"true", "latest", "last"})


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered `checkpoint-N` folder in `output_dir` whose save finished: the Trainer writes
    `trainer_state.json` last, so a folder without it was interrupted (a crash during the save) and is skipped."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    folder = Path(output_dir)
    steps = {
        int(match[1]): path
        for path in (folder.iterdir() if folder.is_dir() else ())
        if (match := pattern.match(path.name)) and (path / TRAINER_STATE_NAME).is_file()
    }
    return str(steps[max(steps)]) if steps else None


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume_from_checkpoint`: a path is kept; True / "true" / "latest" / "last" become the newest complete
    checkpoint in `output_dir` (FileNotFoundError if there is none); False / "false" / None mean a fresh start."""
    if value is None or value is False or (isinstance(value, str) and value.lower() == "false"):
        return None
    if value is True or (isinstance(value, str) and value.lower() in RESUME_LATEST):
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint={value!r}: no complete checkpoint-N folder (one with {TRAINER_STATE_NAME}) in "
                f"{output_dir}; give a checkpoint path, or start without resume_from_checkpoint"
            )
        return latest
    return str(value)


def load_dsv4_model(model_id: str, args: DSV4SFTConfig):
    """`AutoModelForCausalLM.from_pretrained(model_id)` under `memory_efficient_init` (streamed with
    `args.stream_weights`, read by `args.stream_readers` within `args.stream_read_budget_mb`), with
    `args.model_init_kwargs` (dtype default bf16; `device_map` dropped: rank 0 loads on CPU and FSDP2 places the
    shards). The defaults are `DSV4SFTConfig`'s (the trainer converts any other config to one)."""
    kwargs = dict(args.model_init_kwargs or {})
    dtype = resolve_dtype(kwargs.pop("dtype", kwargs.pop("torch_dtype", None)), default=torch.bfloat16)
    if kwargs.pop("device_map", None) is not None:
        logger.info("device_map is ignored: rank 0 loads on CPU and FSDP2 places the shards")
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    _ = args.device  # joins the process group (accelerate's PartialState) before the collective load
    stream = args.stream_weights and streamable(model_id, kwargs.get("subfolder", ""))
    stream = all_gather_object(stream)[0]  # rank 0's view of its files decides for every rank
    readers = args.stream_readers if stream else "rank0"
    budget = (int(args.stream_read_budget_mb * 2**20) or None) if stream else None
    keep_quantized = args.keep_quantized and args.quantized_experts
    if keep_quantized and not stream:
        raise ValueError(
            f"keep_quantized reads {model_id} streamed into FSDP2 shards: set stream_weights (the default) and give a "
            "folder of safetensors files or a hub id"
        )
    with memory_efficient_init(stream=stream, readers=readers, read_budget=budget, keep_quantized=keep_quantized):
        return AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)


def resolve_effort_profile(effort_profile: str, model_id: str) -> str:
    """`effort_profile`, or with "auto" the one rank 0 reads from the checkpoint's encoder file
    (`detect_effort_profile`; "0424" with a warning when it cannot be read, e.g. offline); logged either way. A file
    of an unknown shape fails on every rank."""
    if effort_profile != "auto":
        logger.info("chat format: effort profile %s (given)", effort_profile)
        return effort_profile
    found = None
    with every_rank_raises():
        if rank() == 0:
            try:
                found = detect_effort_profile(model_id)
            except ChatFormatError:
                raise
            except Exception as exc:  # noqa: BLE001 - a hub lookup that cannot be made: the April format, said so
                logger.warning(
                    "could not read %s's encoder file (%s: %s): rendering the 0424 effort profile; pass "
                    "--effort_profile to choose", model_id, type(exc).__name__, exc,
                )  # fmt: skip
                found = "0424"
    found = all_gather_object(found)[0]
    logger.info("chat format: effort profile %s (read from %s)", found, model_id)
    return found


def streamable(model_id: str, subfolder: str = "") -> bool:
    """Whether a model can be streamed: a hub id (the Hub serves DeepSeek-V4 as safetensors) or a local folder with
    safetensors files; a local folder of `.bin` files is loaded whole on rank 0 instead (one log line says so)."""
    folder = Path(model_id) / subfolder
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return True
    logger.info("%s has no safetensors files: loaded whole on rank 0, not streamed", folder)
    return False


def packed_rows(dataset: Dataset, args: SFTConfig, dataset_name: str = "train") -> Dataset:
    """Tokenized samples packed into rows of at most `args.max_length` tokens by TRL's `pack_dataset`
    (`args.packing_strategy`, shuffled first as TRL does); each row keeps its samples' lengths (`seq_lengths`), from
    which TRL's padding-free collator makes position ids that restart per sample."""
    if args.max_length is None:
        raise ValueError("packing needs max_length: the length of a packed row")
    columns = ["input_ids", "labels"] if "labels" in dataset.column_names else ["input_ids"]
    dataset = dataset.select_columns(columns)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Packing {dataset_name} dataset"}
    return pack_dataset(dataset, args.max_length, args.packing_strategy, kwargs)


def _args_trl_accepts(args: SFTConfig) -> tuple[SFTConfig, dict]:
    """The settings TRL's `SFTTrainer` is given (a copy of `args`, or `args`), and those to put back on the trainer's
    args after its `__init__`:

    - padding-free batches without packing: TRL refuses a `max_length` it would not enforce; ours tokenizes every
      sample to at most `max_length` (`overlong`), so TRL sees none;
    - packing under context parallelism: TRL refuses it (torch's context parallelism drops the block-diagonal mask,
      so samples would see each other); hf_dsv4's keeps each sample of a packed row apart (`chunk_inputs` hands the
      row's samples to the attention), so TRL sees padding-free batches (the collator packing uses) and
      `_prepare_dataset` packs."""
    restore = {}
    if args.padding_free and not args.packing:
        restore["max_length"] = args.max_length
    if (args.packing or args.eval_packing) and _context_parallel_configured(args):
        keys = ("max_length", "packing", "eval_packing", "padding_free")
        restore.update({key: getattr(args, key) for key in keys})
    if not restore:
        return args, restore
    trl_args = copy.copy(args)
    trl_args.max_length = None
    if "packing" in restore:
        trl_args.packing, trl_args.eval_packing, trl_args.padding_free = False, False, True
    return trl_args, restore


def _context_parallel_configured(args: SFTConfig) -> bool:
    """Whether accelerate will split sequences (`parallelism_config_cp_size` > 1): `args.parallelism_config`, else
    what `accelerate launch` set from its config file (accelerate's `ParallelismConfig` reads it from the
    environment, as the accelerator will)."""
    from accelerate.parallelism_config import ParallelismConfig

    return (getattr(args, "parallelism_config", None) or ParallelismConfig()).cp_enabled


def _refuse_unsharded_meta_model(model, args: SFTConfig) -> None:
    """A model on the meta device (what `memory_efficient_init` gives every rank but 0) must be sharded, which fills
    it from rank 0; without an FSDP launch the Trainer would move it with `.to()` and fail deep inside torch."""
    if not any(p.is_meta for p in model.parameters()):
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or args.fsdp_plugin_args:
        return
    raise ValueError(
        f"rank {rank()}: the model is on the meta device (memory_efficient_init builds it there on every rank but 0, "
        "and on every rank with stream=True) "
        "but this run does not shard it, so its weights would never arrive: launch with an FSDP accelerate config "
        "(e.g. `accelerate launch --config_file accelerate_configs/fsdp2_cpu_2proc.yaml ...`), or load the model "
        "without memory_efficient_init"
    )


def _own_args(model, args: SFTConfig | None) -> DSV4SFTConfig:
    """The trainer's own `DSV4SFTConfig`: a copy of `args` (converted from a plain `SFTConfig` / `TrainingArguments`),
    or the defaults named after the model; the trainer settles some fields (effort profile, assistant-only loss)."""
    if args is None:
        name = model if isinstance(model, str) else model.config.name_or_path
        return DSV4SFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-SFT")
    if isinstance(args, DSV4SFTConfig):
        return copy.copy(args)
    values = args.to_dict()
    values["hub_token"] = args.hub_token
    return DSV4SFTConfig(**values)


def _refuse_keep_quantized_without_adapter(model, args: DSV4SFTConfig, peft_config) -> None:
    """keep_quantized trains LoRA over a frozen base: a peft_config or a PeftModel is required."""
    by_path = isinstance(model, (str, os.PathLike))
    if args.keep_quantized and peft_config is None and (by_path or peft_model_of(model) is None):
        raise ValueError(
            "keep_quantized keeps the base frozen and trains LoRA adapters only: pass a peft_config (the recipe: "
            "--use_peft) or a PeftModel; full fine-tuning needs the dequantized weights (drop keep_quantized)"
        )


def _loaded(model, args: DSV4SFTConfig) -> tuple[torch.nn.Module, str]:
    """(the model, loaded by `load_dsv4_model` if a path or Hub id was given, with sparse attention if asked; the id
    its tokenizer and chat format are read from). A model on meta that this run will not shard fails on every rank."""
    if isinstance(model, (str, os.PathLike)):
        model_id = str(model)
        model = load_dsv4_model(model_id, args)
    else:
        model_id = model.config.name_or_path
    with every_rank_raises():
        _refuse_unsharded_meta_model(model, args)
    if args.sparse_attention:
        enable_sparse_attention(model, chunk_size=args.sparse_attention_chunk)
    return model, model_id


def _with_one_dsv4_callback(callbacks) -> list:
    """`callbacks` with exactly one `DSV4Callback` that does not save the adapter itself (`save_model` writes it into
    every checkpoint already): a given one is copied with `save_adapter=False`, else one is added. The caller's
    callbacks are left as they were."""
    ours = []
    for callback in callbacks or []:
        if isinstance(callback, DSV4Callback):
            callback = copy.copy(callback)
            callback.save_adapter = False
        ours.append(callback)
    if not any(isinstance(c, DSV4Callback) or c is DSV4Callback for c in ours):
        ours.append(DSV4Callback(save_adapter=False))
    return ours


class DSV4SFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for DeepSeek-V4: memory-efficient loading, FSDP2 sharding, chat-format data, adapter-only
    checkpoints. `init_adapter`: how the adapter it adds from `peft_config` starts (`seeded_lora_init(args.seed)`;
    None without one), handed to its accelerator for a streamed base.

    Args:
        model: a hub id or folder (loaded with `load_dsv4_model`), or a DeepSeek-V4 model / `PeftModel`.
        args: a `DSV4SFTConfig` (a plain `SFTConfig` or `TrainingArguments` is converted; the caller's is copied).
        train_dataset: a map-style `datasets.Dataset` of conversations (or already tokenized rows).
        processing_class: the tokenizer; loaded from the model's id when None. Its chat template is set to
            DeepSeek-V4's.
        callbacks: `Trainer` callbacks; a `DSV4Callback` is added when none is given.
        **kwargs: `SFTTrainer`'s (e.g. `peft_config`, `eval_dataset`).

    Raises:
        ValueError: `keep_quantized` without an adapter; a meta-device model in a run that does not shard it; a
            `formatting_func`; packing without `max_length`.
        TypeError: a dataset that is not a map-style `datasets.Dataset`.
    """

    _tag_names = ["trl", "sft", "hf_dsv4", "deepseek-v4"]

    def __init__(
        self,
        model,
        args: SFTConfig | None = None,
        train_dataset: Dataset | None = None,
        processing_class=None,
        callbacks=None,
        **kwargs,
    ):
        args = _own_args(model, args)  # a copy: the caller's config is left as it was
        _refuse_keep_quantized_without_adapter(model, args, kwargs.get("peft_config"))
        # the adapter this trainer adds starts from the same draw on any number of ranks, streamed or not: each LoRA
        # pair from its own generator (args.seed, layer name); factors on meta are drawn by the accelerator's shard
        self.init_adapter = seeded_lora_init(args.seed) if kwargs.get("peft_config") is not None else None
        model, model_id = _loaded(model, args)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_id)
        args.effort_profile = resolve_effort_profile(args.effort_profile, model_id)
        install_chat_template(processing_class, args.effort_profile)
        if train_dataset is not None and args.assistant_only_loss and len(train_dataset):
            if not is_conversational(train_dataset[0]):
                logger.info(
                    "text prompt-completion rows: the completion is trained (assistant_only_loss does not apply)"
                )
                args.assistant_only_loss = False
        # the caller's settings, which `_prepare_dataset` cuts and packs rows by (TRL may be handed other ones)
        self.row_args = args
        trl_args, restore = _args_trl_accepts(args)
        super().__init__(
            model=model,
            args=trl_args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=_with_one_dsv4_callback(callbacks),
            **kwargs,
        )
        for key, value in restore.items():
            setattr(self.args, key, value)
        peft_model = peft_model_of(self.model)
        if peft_model is not None and self.init_adapter is not None:
            draw_lora_factors(peft_model, args.seed)  # the factors not on meta

    # ------------------------------------------------------------------------------------------------------ data
    # Overrides of upstream internals (TRL's `_prepare_dataset`, the Trainer's checkpoint hooks) are checked at import
    # by `hf_dsv4.compat` (FENCE), which names the package and version if their signatures change.
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if formatting_func is not None:
            raise ValueError(
                "formatting_func is not supported by DSV4SFTTrainer: the DeepSeek-V4 template formats rows"
            )
        if not isinstance(dataset, Dataset):
            raise TypeError(f"DSV4SFTTrainer needs a map-style datasets.Dataset, got {type(dataset).__name__}")
        if self.row_args is not args:  # TRL saw no packing (context parallelism): pack as the caller asked
            own = self.row_args
            packing = own.packing if dataset_name == "train" or own.eval_packing is None else own.eval_packing
        if "input_ids" in dataset.column_names:  # already tokenized (labels, if present, are used as they are)
            return packed_rows(dataset, self.row_args, dataset_name) if packing else dataset
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        conversations = ConversationTokenizer(
            tokenizer,
            thinking_mode=args.thinking_mode,
            drop_thinking=args.drop_thinking,
            reasoning_effort=args.reasoning_effort,
            effort_profile=args.effort_profile,
            turns=args.turns,
            max_length=self.row_args.max_length,
            overlong=args.overlong,
        )
        rows = SFTRowTokenizer(conversations, assistant_only_loss=args.assistant_only_loss, react=args.react)
        with args.main_process_first(desc=f"tokenizing the {dataset_name} dataset"):
            dataset = tokenize_dataset(dataset, rows, num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name}")
            return packed_rows(dataset, self.row_args, dataset_name) if packing else dataset

    def _context_parallel_mesh(self):
        """The ranks that share each sequence (accelerate's "cp" mesh dimension), or None without context
        parallelism."""
        config = getattr(self.accelerator, "parallelism_config", None)
        return self.accelerator.torch_device_mesh["cp"] if config is not None and config.cp_enabled else None

    def _prepare_context_parallel_inputs(self, model, inputs):
        """Under context parallelism (accelerate's `parallelism_config_cp_size`), this rank's contiguous chunk of each
        sequence, labels shifted before the split (`hf_dsv4.modeling.chunk_inputs`); the attention layers read what
        they need of the other chunks (`enable_context_parallel`, applied by the accelerator)."""
        mesh = self._context_parallel_mesh()
        if mesh is None:
            return contextlib.nullcontext, inputs
        return contextlib.nullcontext, chunk_inputs(inputs, mesh.get_local_rank(), mesh.size())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """TRL's, and under context parallelism each rank evaluates its chunk (TRL's would run the whole sequence on
        every rank): the chunks' losses weighted by their trained tokens over the ranks that share the sequence, so
        each of them returns the sequence's loss per trained token."""
        mesh = self._context_parallel_mesh()
        if mesh is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if not prediction_loss_only:
            raise ValueError(
                "under context parallelism evaluation computes the loss only (no logits, no compute_metrics)"
            )
        _, chunk = self._prepare_context_parallel_inputs(model, self._prepare_inputs(inputs))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, chunk).detach()  # per trained token of the chunk
        trained = (chunk["shift_labels"] != -100).sum().to(loss)
        total = torch.stack([loss * trained, trained])
        torch.distributed.all_reduce(total, group=mesh.get_group())
        return total[0] / total[1].clamp(min=1), None, None

    # ----------------------------------------------------------------------------------------------- accelerator
    def create_accelerator_and_postprocess(self) -> None:
        with dsv4_trainer_accelerator(self.args.fsdp_plugin_args, self.init_adapter):
            super().create_accelerator_and_postprocess()

    @property
    def is_dsv4_sharded(self) -> bool:
        """True when the model is (to be) sharded by `hf_dsv4.shard_model` through `DSV4FSDP2Plugin`."""
        return self.is_fsdp_enabled and isinstance(self.accelerator.state.fsdp_plugin, DSV4FSDP2Plugin)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for callback in self.callback_handler.callbacks:  # the callback's metrics, before the loggers see the logs
            if isinstance(callback, DSV4Callback):
                callback.add_metrics(logs, self.state)
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------------------- saving
    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write `README.md` into `output_dir`: PEFT-style metadata (`library_name: peft`, `base_model`, ...), what was
        trained on what and how, the loss by step and a quick start (`hf_dsv4.training.model_card`). Called at every
        checkpoint and by `push_to_hub`; a `dataset_name` given once is remembered for later cards."""
        if dataset_name is not None:
            self._card_dataset_name = dataset_name
        if not self.is_world_process_zero():
            return
        card = model_card(self, model_name, getattr(self, "_card_dataset_name", None), tags)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    @property
    def checkpoint_mode(self) -> str:
        """How checkpoints of the sharded model are written: "SHARDED_STATE_DICT" (every rank its shards, DCP) or
        "FULL_STATE_DICT" (gathered on rank 0), from the launch config's `fsdp_state_dict_type`."""
        return state_dict_mode(self.accelerator.state.fsdp_plugin)

    def _is_checkpoint_folder(self, output_dir: str) -> bool:
        """Whether `save_model` writes into the Trainer's checkpoint folder of this step (not an export)."""
        return Path(output_dir).name == f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapter in PEFT format (+ tokenizer and training arguments). Full fine-tuning under FSDP2: the
        model gathered on rank 0 and written by `save_pretrained` (`FULL_STATE_DICT`), or, under
        `SHARDED_STATE_DICT`, each rank's shards with DCP in a checkpoint and a Hub-loadable model written rank by
        rank (`save_pretrained_sharded`) anywhere else. Every rank must call it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if peft_model_of(self.model) is not None:
            save_adapter(self.model, output_dir)
        elif self.is_dsv4_sharded:
            if self.checkpoint_mode == FULL:
                save_full_model(self.model, output_dir, self.args.should_save)
            elif _internal_call and self._is_checkpoint_folder(output_dir):
                save_sharded_model(self.model, output_dir)
            else:
                save_pretrained_sharded(self.model, output_dir)
        else:
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _unwrapped_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_dsv4_sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Only trainable parameters have optimizer state: for LoRA, the adapter's moments only.
        if self.checkpoint_mode == FULL:
            save_full_optimizer(self.model, self._unwrapped_optimizer(), output_dir, self.args.should_save)
        else:
            save_sharded_optimizer(self.model, self._unwrapped_optimizer(), output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # --------------------------------------------------------------------------------------------------- resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, where `resume_from_checkpoint` may also be "true" / "latest" (what the command line
        gives): the newest complete checkpoint in `output_dir` (see `resolve_resume_from_checkpoint`)."""
        resume = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:
            logger.info("resuming from %s", resume)
        return super().train(resume_from_checkpoint=resume, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.is_dsv4_sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if peft_model_of(self.model) is None:
            logger.info("loading the model from %s into the shards", resume_from_checkpoint)
            load_model(self.model, resume_from_checkpoint)
        else:
            logger.info("loading the adapter from %s into the shards", resume_from_checkpoint)
            load_adapter(self.model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.is_dsv4_sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer(self.model, self._unwrapped_optimizer(), checkpoint)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        self.lr_scheduler.load_state_dict(torch.load(scheduler, map_location="cpu", weights_only=True))
        logger.info("optimizer and scheduler state restored from %s", checkpoint)
