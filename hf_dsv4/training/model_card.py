"""The model card (`README.md`) written next to a DeepSeek-V4 adapter or model: PEFT's metadata conventions, what was
trained on what and how, the training results, and a quick start that runs.

`DSV4SFTTrainer.create_model_card` (what `save_model` checkpoints and `push_to_hub` call) builds it with
`model_card(trainer, ...)`. Nothing here touches the network: the base model's license is read from its local copy
(a local folder, or the Hugging Face cache) when there is one, else left out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..template.tokenization import IGNORE_INDEX
from .lora import LORA_TARGETS

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")
DATA_FILE_SUFFIXES = frozenset({".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt"})
TAGS = ("deepseek-v4", "hf_dsv4", "sft", "trl")
MAX_LOSS_ROWS = 20


def base_reference(name_or_path: str | None) -> tuple[str | None, str]:
    """(the base model's hub id or None, how the card names it). A folder of the Hugging Face cache counts as its
    repo; any other existing folder is a local checkpoint, named by its folder name only."""
    if not name_or_path:
        return None, "an unnamed base model"
    snapshot = CACHE_SNAPSHOT.search(str(name_or_path))
    if snapshot:
        repo = f"{snapshot[1]}/{snapshot[2]}"
        return repo, f"[{repo}](https://huggingface.co/{repo})"
    if os.path.isdir(name_or_path):
        return None, f"a local checkpoint (`{Path(name_or_path).name}`, not on the Hub)"
    if HUB_ID.match(name_or_path):
        return name_or_path, f"[{name_or_path}](https://huggingface.co/{name_or_path})"
    return None, f"`{name_or_path}`"


def base_license(name_or_path: str | None, hub_id: str | None) -> str | None:
    """The `license` of the base model's own card, from a local copy only (its folder, or the Hub cache)."""
    readme = Path(name_or_path) / "README.md" if name_or_path and os.path.isdir(name_or_path) else None
    if (readme is None or not readme.is_file()) and hub_id is not None:
        from huggingface_hub import hf_hub_download

        try:
            readme = Path(hf_hub_download(hub_id, "README.md", local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or no card): the license is left out
            return None
    if readme is None or not readme.is_file():
        return None
    return ModelCard.load(readme).data.to_dict().get("license")


def dataset_reference(dataset_name: str | None) -> tuple[str | None, str]:
    """(the dataset's hub id or None, how the card names it)."""
    if not dataset_name:
        return None, "a dataset passed in Python"
    if os.path.exists(dataset_name) or Path(dataset_name).suffix.lower() in DATA_FILE_SUFFIXES:
        return None, f"a local dataset (`{Path(dataset_name).name}`)"
    if HUB_ID.match(dataset_name):
        return dataset_name, f"[{dataset_name}](https://huggingface.co/datasets/{dataset_name})"
    return None, f"`{dataset_name}`"


def adaptation(peft_config: Any) -> str:
    """One line on what was trained: the LoRA preset (or targets), rank and alpha; or full fine-tuning."""
    if peft_config is None:
        return "full fine-tuning (every parameter)"
    modules, parameters = peft_config.target_modules, peft_config.target_parameters
    preset = next(
        (name for name, (m, p) in LORA_TARGETS.items() if m == modules and sorted(p or []) == sorted(parameters or [])),
        None,
    )
    if isinstance(modules, (set, list, tuple)):
        modules = ", ".join(sorted(modules))
    targets = f"the `{preset}` preset of `hf_dsv4.training.lora`" if preset else f"`{modules}`"
    if parameters and not preset:
        targets += f" + parameters `{', '.join(parameters)}`"
    rank, alpha = peft_config.r, peft_config.lora_alpha
    return f"LoRA, rank {rank}, alpha {alpha}, dropout {peft_config.lora_dropout}, on {targets}"


def trained_tokens(dataset: Any) -> int | None:
    """Tokens with a label (the trained ones) in a tokenized `datasets.Dataset`, counted in Arrow."""
    if dataset is None or "labels" not in getattr(dataset, "column_names", ()):
        return None
    import pyarrow.compute as pc

    labels = dataset.data.column("labels")
    return int(pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0)


def loss_table(log_history: list[dict]) -> str:
    """A markdown table of the training loss by step (at most MAX_LOSS_ROWS evenly spread steps, the first and the last
    always) and, on every step where one was logged, the eval loss."""
    train = {e["step"]: e["loss"] for e in log_history if "loss" in e and "step" in e}
    evals = {e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e and "step" in e}
    if not train and not evals:
        return "No loss was logged."
    steps = sorted(train)
    spread = (
        {steps[round(i * (len(steps) - 1) / (MAX_LOSS_ROWS - 1))] for i in range(MAX_LOSS_ROWS)} if steps else set()
    )
    cell = lambda table, step: f"{table[step]:.4f}" if step in table else ""  # noqa: E731
    if not evals:
        rows = ["| step | training loss |", "| ---: | ---: |"]
        return "\n".join(rows + [f"| {step} | {cell(train, step)} |" for step in sorted(spread)])
    rows = ["| step | training loss | eval loss |", "| ---: | ---: | ---: |"]
    return "\n".join(rows + [f"| {s} | {cell(train, s)} | {cell(evals, s)} |" for s in sorted(spread | set(evals))])


def precision(args: Any, model: Any) -> str:
    dtype = str(getattr(model, "dtype", "")).replace("torch.", "")
    compute = "bf16 mixed precision" if args.bf16 else "fp16 mixed precision" if args.fp16 else "no mixed precision"
    return f"weights in {dtype or 'the checkpoint dtype'}, {compute} (hyper-connections, norms, sinks and router bias in fp32)"


# The quick start: how the model is loaded (an adapter on its base, or a full model), then the same generation.
LOAD_ADAPTER = """import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_dsv4.template import parse_completion  # hf_dsv4's DSML / tool-call parser

base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16){base_comment}
model = PeftModel.from_pretrained(base, {adapter!r})
"""
LOAD_FULL = """import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_dsv4.template import parse_completion  # hf_dsv4's DSML / tool-call parser

model = AutoModelForCausalLM.from_pretrained({adapter!r}, dtype=torch.bfloat16)
"""
GENERATE = """tokenizer = AutoTokenizer.from_pretrained({adapter!r})  # carries the DeepSeek-V4 chat template it was trained with

messages = [{{"role": "user", "content": "What is 17 * 23?"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, thinking_mode={thinking!r}, return_dict=True, return_tensors="pt"
)
output = model.generate(**inputs, max_new_tokens=128)
completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
# an OpenAI-style assistant message (reasoning, content, tool calls); strict=False keeps malformed output as content
print(parse_completion(completion, thinking_mode={thinking!r}, strict=False))
"""


def model_card(trainer: Any, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> ModelCard:
    """The model card for what `trainer` trained; call it on the main process, after or during training.

    Args:
        trainer: the `DSV4SFTTrainer` (its args, model, train dataset and log history are read).
        model_name: the card's title and `model_name` metadata; the output folder's name when None.
        dataset_name: the dataset's Hub id or local path, as the card names it.
        tags: extra Hub tags (a string or a list), added to hf_dsv4's own.

    Returns:
        A `huggingface_hub.ModelCard` (YAML metadata, then markdown).
    """
    from .adapter import peft_model_of

    args = trainer.args
    peft_model = peft_model_of(trainer.model)
    peft_config = peft_model.peft_config["default"] if peft_model is not None else None
    unwrapped = peft_model.get_base_model() if peft_model is not None else trainer.model
    name_or_path = getattr(unwrapped.config, "name_or_path", None)
    base_id, base_text = base_reference(name_or_path)
    data_id, data_text = dataset_reference(dataset_name)
    adapter = repo_or_folder(trainer)
    base_for_code = base_id or name_or_path or "path/to/the/base/model"
    data = card_metadata(peft_config is not None, name_or_path, base_id, data_id, model_name, tags)
    what = "A LoRA adapter" if peft_config is not None else "A fully fine-tuned model"
    lines = [
        f"# {model_name or Path(args.output_dir).name}",
        "",
        f"{what} for DeepSeek-V4, trained from {base_text} with supervised fine-tuning by hf_dsv4 (TRL's "
        "`SFTTrainer` under FSDP2) on the DeepSeek-V4 chat format.",
        "",
        *quick_start_section(args.thinking_mode, peft_config is not None, base_id, base_for_code, adapter),
        "",
        *training_section(trainer, peft_config, data_text, unwrapped),
        "",
        *results_section(trainer.state.log_history),
        "",
        "## Framework versions",
        "",
        *versions(),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def card_metadata(
    lora: bool, name_or_path: str | None, base_id: str | None, data_id: str | None, model_name: str | None, tags
) -> ModelCardData:
    """The card's YAML metadata: library, tags, license, dataset, and the base model with its relation."""
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    metadata = {
        "library_name": "peft" if lora else "transformers",
        "pipeline_tag": "text-generation",
        "tags": sorted({*TAGS, "lora" if lora else "full-fine-tuning", *extra_tags}),
        "license": base_license(name_or_path, base_id),
        "datasets": [data_id] if data_id else None,
        "model_name": model_name,
    }
    if base_id:
        metadata["base_model"] = base_id
        metadata["base_model_relation"] = "adapter" if lora else "finetune"
    return ModelCardData(**{k: v for k, v in metadata.items() if v is not None})


def quick_start_section(thinking_mode: Any, lora: bool, base_id: str | None, base: str, adapter: str) -> list[str]:
    """The "Quick start" lines: loading and generation code that runs, then how to serve the model."""
    comment = "" if base_id else "  # the base was a local checkpoint: point this at your copy"
    code = (LOAD_ADAPTER if lora else LOAD_FULL) + GENERATE
    code = code.format(base=base, base_comment=comment, adapter=adapter, thinking=thinking_mode)
    return [
        "## Quick start",
        "",
        f"```python\n{code}```",
        "",
        "The tokenizer's chat template renders DeepSeek-V4's prompt format byte for byte (thinking and chat modes, "
        "tools, reasoning effort); `parse_completion` turns the generated text, DSML tool calls included, back into "
        "a message. " + serving(lora, adapter, base),
    ]


def training_section(trainer: Any, peft_config: Any, data_text: str, model: Any) -> list[str]:
    """The "Training" lines: what was adapted, on which data, in which chat format, optimisation, batch, precision."""
    args, state = trainer.args, trainer.state
    world = args.world_size
    samples = len(trainer.train_dataset) if trainer.train_dataset is not None else None
    tokens = trained_tokens(trainer.train_dataset)
    seen = next((e["num_tokens"] for e in reversed(state.log_history) if "num_tokens" in e), None)
    return [
        "## Training",
        "",
        f"- Adaptation: {adaptation(peft_config)}.",
        f"- Data: {data_text}; {samples if samples is not None else 'an unknown number of'} training samples"
        + (f", {tokens:,} trained (assistant) tokens per epoch" if tokens is not None else "")
        + (f", {int(seen):,} input tokens seen" if seen is not None else "")
        + ".",
        f"- Chat format: thinking mode `{args.thinking_mode}`, turns `{args.turns}`, earlier reasoning "
        f"{'dropped' if args.drop_thinking else 'kept'}, reasoning effort `{args.reasoning_effort}` "
        f"(effort profile `{getattr(args, 'effort_profile', '0424')}`), max length "
        f"{args.max_length}, over-long samples `{args.overlong}`, assistant-only loss `{args.assistant_only_loss}`.",
        f"- Optimisation: learning rate {args.learning_rate}, {_value(args.lr_scheduler_type)} schedule, warmup "
        f"{args.warmup_steps}, optimizer `{_value(args.optim)}`, weight decay {args.weight_decay}, "
        f"max gradient norm {args.max_grad_norm}, seed {args.seed}.",
        f"- Batch: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
        f"steps x {world} {'process' if world == 1 else 'processes'} = "
        f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * world} "
        f"samples per step; {state.global_step} steps ({state.epoch or 0:.2f} epochs).",
        f"- Precision: {precision(args, model)}.",
    ]


def results_section(log_history: list[dict]) -> list[str]:
    """The "Results" lines: the loss table, then the final eval loss when one was logged."""
    final_eval = next((e["eval_loss"] for e in reversed(log_history) if "eval_loss" in e), None)
    lines = ["## Results", "", loss_table(log_history)]
    if final_eval is not None:
        lines += ["", f"Final eval loss: {final_eval:.4f}."]
    return lines


def repo_or_folder(trainer: Any) -> str:
    """Where a reader of the card finds this model: its Hub repo when it is pushed (`hub_model_id`, or the id the
    Trainer created for the push from the output folder's name), else the output folder."""
    args = trainer.args
    repo = args.hub_model_id or (getattr(trainer, "hub_model_id", None) if args.push_to_hub else None)
    return repo or os.path.abspath(args.output_dir)


def serving(adapter: bool, where: str, base: str) -> str:
    """The card's serving sentence: the commands the README gives (vLLM reads DeepSeek-V4 LoRA under the checkpoint's
    own names, so the adapter is exported first; a merge reads the base one decoder layer at a time)."""
    if not adapter:
        return "The folder is a transformers checkpoint: serve it as one (`vllm serve <folder>`)."
    return (
        f"To serve it with vLLM, export it to DeepSeek-V4's checkpoint names first: `python -m hf_dsv4.export {where} "
        f"<out>`, then `vllm serve {base} --enable-lora --lora-modules adapter=<out>`; or merge it into its base, one "
        f"decoder layer at a time: `python -m hf_dsv4.merge {base} {where} <out>` (a bf16 checkpoint any engine serves)."
    )


def _value(option: Any) -> Any:
    """An enum option's value ("linear", not SchedulerType.LINEAR)."""
    return getattr(option, "value", option)


def versions() -> list[str]:
    from importlib.metadata import version

    return [f"- {name}: {version(name)}" for name in ("hf_dsv4", "transformers", "peft", "trl", "torch")]
