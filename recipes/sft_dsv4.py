"""Supervised fine-tuning of DeepSeek-V4 with LoRA under FSDP2: the hf_dsv4 main job.

    accelerate launch [--config_file accelerate_configs/X.yaml] recipes/sft_dsv4.py \
        [--config recipes/configs/Y.yaml] [--flag value ...]

Flags are TRL's (`ScriptArguments`, `SFTConfig`, `ModelConfig`) plus `DSV4SFTConfig`'s, parsed once by `TrlParser`: a
`--config` YAML sets the same names and the command line overrides it. `--dataset_name` / `--eval_dataset_name`: a
hub dataset or a local .json/.jsonl/.parquet/.csv file; `--lora_target_modules`: a preset (`attention`,
`attention+shared`, `all`) or module names; `--resume_from_checkpoint`: a path, or `true` / `latest`. With neither
`--model_name_or_path` nor `--config`, `recipes/configs/tiny_cpu.yaml` runs: a tiny DeepSeek-V4 built locally
(`hf_dsv4.testing`) trained on the demo data in `recipes/data/` for a few dozen CPU steps, saving a PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
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
        default="tiny-dsv4", metadata={"help": "Where the built-in tiny model is written (relative: in output_dir)."}
    )


@dataclass
class DSV4ScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus an evaluation file for local datasets."""

    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data (a local file or a hub dataset); default: the hub --dataset_name's test split."
        },
    )


def parse_args(argv: list[str] | None = None) -> tuple[DSV4ScriptArguments, DSV4SFTConfig, DSV4ModelConfig]:
    """One parse of the command line and the `--config` YAML (TRL's `TrlParser`); the model's settings go into
    `model_init_kwargs`, where `DSV4SFTConfig` decides the compute precision (float32 weights: no bf16 unless asked)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(a.startswith("--model_name_or_path") for a in argv):
        argv = ["--config", str(TINY_CONFIG), *argv]
    parser = TrlParser((DSV4ScriptArguments, DSV4SFTConfig, DSV4ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    model_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision,
                    "attn_implementation": model_args.attn_implementation}  # fmt: skip
    bf16 = training_args.bf16 if training_args.precision_given else None  # None: decided from the dtype
    kwargs = {**(training_args.model_init_kwargs or {}), **model_kwargs}
    return script_args, dataclasses.replace(training_args, model_init_kwargs=kwargs, bf16=bf16), model_args


def load_split(name: str, split: str, config: str | None = None, flag: str = "--dataset_name") -> datasets.Dataset:
    """A local file (by extension; relative paths also from the repository root) as one split, or a hub split."""
    suffix = Path(name).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        return load_dataset(name, config, split=split)
    if not Path(name).is_file() and (RECIPES.parent / name).is_file():
        name = str(RECIPES.parent / name)  # the repository's own files, from any working directory
    if not Path(name).is_file():
        raise FileNotFoundError(f"{flag} {name}: no such file")
    return load_dataset(LOCAL_FORMATS[suffix], data_files={split: name}, split=split)


def load_eval_dataset(args: DSV4ScriptArguments, training_args: DSV4SFTConfig) -> datasets.Dataset | None:
    """With `--eval_strategy` not "no": `--eval_dataset_name`, else the hub dataset's `--dataset_test_split` (as
    TRL's sft.py); a local training file has no test split."""
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
    ours = log_level if training_args.log_level != "passive" else logging.INFO  # hf_dsv4's progress: INFO on rank 0
    for name in ("hf_dsv4", "sft_dsv4"):
        logging.getLogger(name).setLevel(ours if training_args.should_log else max(ours, logging.WARNING))

    model_id = model_args.model_name_or_path or tiny_model(training_args, model_args)
    m = model_args
    peft_config = dsv4_lora_config(
        r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout, targets=m.lora_target_modules,
        target_parameters=m.lora_target_parameters, use_rslora=m.use_rslora, use_dora=m.use_dora,
        modules_to_save=m.lora_modules_to_save,
    ) if m.use_peft else None  # fmt: skip
    if script_args.dataset_name is None:
        raise ValueError("--dataset_name is required when a model is given (a hub dataset or a local data file)")
    train_dataset = load_split(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    eval_dataset = load_eval_dataset(script_args, training_args)
    logger.info("model %s, %d training rows, LoRA %s", model_id, len(train_dataset), "on" if peft_config else "off")
    trainer = DSV4SFTTrainer(
        model_id, training_args, train_dataset, eval_dataset=eval_dataset, peft_config=peft_config, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)  # README.md: names the dataset too
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    logger.info("adapter saved to %s", os.path.abspath(training_args.output_dir))
    trainer.end()  # trackers finished and the process group destroyed on every rank before the interpreter exits
    return trainer


if __name__ == "__main__":
    main(*parse_args())
