"""Supervised fine-tuning of DeepSeek-V4 with LoRA under FSDP2: the hf_dsv4 main job.

    accelerate launch [--config_file accelerate_configs/X.yaml] recipes/sft_dsv4.py \
        [--config recipes/configs/Y.yaml] [--flag value ...]

Flags are TRL's (`ScriptArguments`, `SFTConfig`, `ModelConfig`) plus hf_dsv4's `DSV4SFTConfig` fields (`--turns`,
`--overlong`, `--thinking_mode`, `--drop_thinking`, `--react`); a `--config` YAML sets the same names and the command
line overrides it. `--dataset_name` is a hub dataset or a local .json/.jsonl/.parquet/.csv file (CSV: text
prompt/completion rows only); `--lora_target_modules` takes a preset name (`attention`, `attention+shared`, `all`;
see `hf_dsv4.training.lora`) or module names. Evaluation as in TRL's sft.py (`--eval_strategy`, `--eval_steps`, the
hub dataset's `--dataset_test_split`), plus `--eval_dataset_name <file>` for local data. `--resume_from_checkpoint`
takes a checkpoint path, or `true` / `latest` for the newest complete `checkpoint-N` in `--output_dir`.

With no `--model_name_or_path` (and no `--config`), the built-in default runs: `recipes/configs/tiny_cpu.yaml`, a
tiny DeepSeek-V4 built locally by `hf_dsv4.testing` (every layer type, hash and top-k routers) trained on the demo
dataset shipped in `recipes/data/` — a few dozen steps on CPU that save a PEFT adapter to `--output_dir`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser

from hf_dsv4 import DSV4SFTConfig, DSV4SFTTrainer, dsv4_lora_config

logger = logging.getLogger("sft_dsv4")

RECIPES = Path(__file__).resolve().parent
TINY_CONFIG = RECIPES / "configs" / "tiny_cpu.yaml"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DSV4ModelConfig(ModelConfig):
    """TRL's `ModelConfig` with DeepSeek-V4 defaults: bf16 weights and LoRA on."""

    dtype: str = field(
        default="bfloat16",
        metadata={"help": "Weight dtype to load the model in.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: full fine-tuning)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    tiny_model_dir: str = field(
        default="tiny-dsv4",
        metadata={
            "help": "Where the built-in tiny model is written when no model_name_or_path is given (relative "
            "paths are inside output_dir)."
        },
    )


@dataclass
class DSV4ScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus an evaluation file for local datasets."""

    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data when --eval_strategy is not 'no': a local .json/.jsonl/.parquet/.csv file, or a "
            "hub dataset (its --dataset_test_split). Default: the --dataset_test_split of the hub --dataset_name."
        },
    )


def _option(argv: list[str], config: dict, name: str) -> str | None:
    """The value of `--name` on the command line (`--name v` or `--name=v`), else in the YAML config, else None."""
    for index, arg in enumerate(argv):
        if arg == f"--{name}":
            return argv[index + 1] if index + 1 < len(argv) else "true"
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    value = config.get(name)
    return None if value is None else str(value)


def fp32_unless_asked(argv: list[str]) -> list[str]:
    """`--dtype float32` means float32 compute: `--bf16 false` is added unless `--bf16` or `--fp16` is given (on the
    command line or in the `--config` YAML), since TRL's default (bf16) is fixed before the model dtype is known."""
    config_path = _option(argv, {}, "config")
    config = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {}
    dtype = _option(argv, config, "dtype") or DSV4ModelConfig.dtype
    if dtype == "float32" and _option(argv, config, "bf16") is None and _option(argv, config, "fp16") is None:
        return [*argv, "--bf16", "false"]
    return argv


def parse_args(argv: list[str] | None = None) -> tuple[DSV4ScriptArguments, DSV4SFTConfig, DSV4ModelConfig]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--model_name_or_path") for a in argv):
        argv = ["--config", str(TINY_CONFIG), *argv]
    parser = TrlParser((DSV4ScriptArguments, DSV4SFTConfig, DSV4ModelConfig))
    return parser.parse_args_and_config(fp32_unless_asked(argv))


def load_split(name: str, split: str, config: str | None = None, flag: str = "--dataset_name") -> datasets.Dataset:
    """A local file (by extension; relative paths also from the repository root) as one split, or a hub split."""
    suffix = Path(name).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not Path(name).is_file() and (RECIPES.parent / name).is_file():
            name = str(RECIPES.parent / name)  # the repository's own files, from any working directory
        if not Path(name).is_file():
            raise FileNotFoundError(f"{flag} {name}: no such file")
        return load_dataset(LOCAL_FORMATS[suffix], data_files={split: name}, split=split)
    return load_dataset(name, config, split=split)


def load_train_dataset(args: ScriptArguments) -> datasets.Dataset:
    """`--dataset_name` as a local file (by extension) or a hub dataset; the train split."""
    if args.dataset_name is None:
        raise ValueError(
            "--dataset_name is required when a model is given (a hub dataset or a local .json/.jsonl/.parquet/.csv file)"
        )
    return load_split(args.dataset_name, args.dataset_train_split, args.dataset_config)


def load_eval_dataset(args: DSV4ScriptArguments, training_args: DSV4SFTConfig) -> datasets.Dataset | None:
    """The evaluation split when `--eval_strategy` is not "no": `--eval_dataset_name`, else the hub dataset's
    `--dataset_test_split` (as TRL's sft.py); a local training file needs `--eval_dataset_name`."""
    if training_args.eval_strategy == "no":
        return None
    if args.eval_dataset_name:
        return load_split(args.eval_dataset_name, args.dataset_test_split, args.dataset_config, "--eval_dataset_name")
    if args.dataset_name and Path(args.dataset_name).suffix.lower() not in LOCAL_FORMATS:
        return load_split(args.dataset_name, args.dataset_test_split, args.dataset_config)
    raise ValueError(
        f"--eval_strategy {training_args.eval_strategy} needs evaluation data: give --eval_dataset_name <file> (a local "
        f"--dataset_name {args.dataset_name} has no test split), or --eval_strategy no"
    )


def tiny_model(training_args: DSV4SFTConfig, model_args: DSV4ModelConfig) -> str:
    """Build the built-in tiny DeepSeek-V4 checkpoint (once, on the main process) and return its path."""
    from hf_dsv4.testing import build_tiny_dsv4

    path = Path(model_args.tiny_model_dir)
    if not path.is_absolute():
        path = Path(training_args.output_dir) / path
    with training_args.main_process_first(local=False, desc="building the tiny DeepSeek-V4"):
        if not (path / "config.json").is_file():
            logger.info("building the built-in tiny DeepSeek-V4 in %s", path)
            build_tiny_dsv4(path, dtype=torch.float32, seed=0)
    return str(path)


def main(script_args, training_args, model_args, callbacks=None) -> DSV4SFTTrainer:
    log_level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    # hf_dsv4's own progress (loading, sharding, tokenization counts, adapter saves) at INFO on the main process
    # unless --log_level says otherwise; WARNING on the other ranks.
    ours = log_level if training_args.log_level != "passive" else logging.INFO
    for name in ("hf_dsv4", "sft_dsv4"):
        logging.getLogger(name).setLevel(ours if training_args.should_log else max(ours, logging.WARNING))

    model_id = model_args.model_name_or_path or tiny_model(training_args, model_args)
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "dtype": model_args.dtype,
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
    }
    peft_config = None
    if model_args.use_peft:
        peft_config = dsv4_lora_config(
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            targets=model_args.lora_target_modules,
            target_parameters=model_args.lora_target_parameters,
            use_rslora=model_args.use_rslora,
            use_dora=model_args.use_dora,
            modules_to_save=model_args.lora_modules_to_save,
        )
    train_dataset = load_train_dataset(script_args)
    eval_dataset = load_eval_dataset(script_args, training_args)
    logger.info("model %s, %d training rows, LoRA %s", model_id, len(train_dataset), "on" if peft_config else "off")
    trainer = DSV4SFTTrainer(
        model=model_id,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)  # README.md: names the dataset too
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if trainer.is_world_process_zero():
        logger.info("adapter saved to %s", os.path.abspath(training_args.output_dir))
    # Trackers finished and the process group destroyed on every rank before the interpreter exits (a rank that exits
    # with gloo's threads still running can abort with "terminate called without an active exception").
    trainer.end()
    return trainer


if __name__ == "__main__":
    main(*parse_args())
