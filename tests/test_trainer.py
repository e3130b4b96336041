"""`DSV4SFTTrainer` in one process: data preparation, training, PEFT-format save that reloads to the same logits,
and `push_to_hub` with the hub client intercepted at its upload API (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hub_capture import capture_hub_commits
from numerics import assert_as_accurate_as_stock, in_float64
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_dsv4 import DSV4SFTConfig, DSV4SFTTrainer, dsv4_lora_config, enable_sparse_attention
from hf_dsv4.template import tokenize_conversation

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]  # fmt: skip


def _rows(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2:
            call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": i})}}  # fmt: skip
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "reasoning_content": "Use the tool.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "content": str(2 * i)},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
            rows.append({"messages": messages, "tools": json.dumps(TOOLS)})
        else:
            messages = [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "reasoning_content": "Easy.", "content": f"{i}!"},
            ]
            rows.append({"messages": messages, "tools": None})
    return rows


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt_fp32) -> Path:
    return tiny_ckpt_fp32


def _args(out: Path, **overrides) -> DSV4SFTConfig:
    values = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                  logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
                  model_init_kwargs={"dtype": "float32"}, dataloader_num_workers=0)  # fmt: skip
    values.update(overrides)
    return DSV4SFTConfig(**values)


def test_trains_saves_and_reloads_to_the_same_logits(checkpoint, tmp_path):
    rows = _rows()
    trainer = DSV4SFTTrainer(
        str(checkpoint),
        args=_args(tmp_path / "out"),
        train_dataset=Dataset.from_list(rows),
        peft_config=dsv4_lora_config(r=4, alpha=8, targets="attention+shared"),
    )
    # the data is our tokenization of each row (tools from the JSON string column), nothing else
    assert trainer.train_dataset.column_names == ["input_ids", "attention_mask", "labels"]
    for row, sample in zip(rows, trainer.train_dataset):
        expected = tokenize_conversation(trainer.processing_class, row["messages"], json.loads(row["tools"] or "null"))
        assert sample["input_ids"] == expected["input_ids"] and sample["labels"] == expected["labels"]

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(
        {"tokens_per_second", "peak_memory_gb", "moe_imbalance", "moe_max_expert_share"} <= set(e) for e in logged
    )

    trainer.save_model()
    out = tmp_path / "out"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    ids = torch.tensor([trainer.train_dataset[1]["input_ids"]])
    model = trainer.model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        plain = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, out)
        truth = in_float64(reloaded)(input_ids=ids).logits  # the oracle of the tolerance below
        stock_attention = reloaded(input_ids=ids).logits
        reloaded = enable_sparse_attention(reloaded)(input_ids=ids).logits  # as the trainer computes (its default)
    assert torch.equal(reloaded, trained)
    assert_as_accurate_as_stock(trained, stock_attention, truth, "logits")  # transformers' attention: rounding
    assert not torch.allclose(plain, trained)


def test_push_to_hub_uploads_exactly_the_saved_folder_and_a_model_card(checkpoint, tmp_path):
    uploads: list[dict] = []
    out = tmp_path / "out"
    with capture_hub_commits(uploads):
        trainer = DSV4SFTTrainer(
            str(checkpoint),
            args=_args(out, max_steps=2, push_to_hub=True, hub_model_id="acme/dsv4-lora", hub_token="hf_test"),
            train_dataset=Dataset.from_list(_rows(4)),
            peft_config=dsv4_lora_config(r=4, alpha=8),
        )
        trainer.train()
        trainer.push_to_hub()

    assert len(uploads) == 1 and uploads[0]["repo_id"] == "acme/dsv4-lora"
    files = uploads[0]["files"]
    on_disk = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert files == on_disk  # the folder itself, byte for byte, and nothing else
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                          "tokenizer.json", "tokenizer_config.json", "training_args.bin"}  # fmt: skip
    card = files["README.md"].decode()
    assert "hf_dsv4" in card and "deepseek-v4" in card


def test_a_pushed_card_names_the_repo_the_trainer_created_not_a_local_folder(checkpoint, tmp_path):
    """push_to_hub without hub_model_id: the Trainer creates the repo from the output folder's name; the card's quick
    start and serving commands name that repo, which is where its reader finds the adapter."""
    uploads: list[dict] = []
    out = tmp_path / "dsv4-lora-pushed"
    with capture_hub_commits(uploads):
        trainer = DSV4SFTTrainer(
            str(checkpoint), args=_args(out, max_steps=1, push_to_hub=True, hub_token="hf_test"),
            train_dataset=Dataset.from_list(_rows(2)), peft_config=dsv4_lora_config(r=4, alpha=8),
        )  # fmt: skip
        trainer.train()
        trainer.push_to_hub()
    repo = uploads[-1]["repo_id"]
    card = uploads[-1]["files"]["README.md"].decode()
    assert repo.endswith("dsv4-lora-pushed") and trainer.hub_model_id == repo
    assert f"PeftModel.from_pretrained(base, {repo!r})" in card
    assert f"`python -m hf_dsv4.export {repo} <out>`" in card and str(out) not in card


def test_text_prompt_completion_rows_train_the_completion(checkpoint, tmp_path):
    rows = [{"prompt": f"Count to {i}:", "completion": " " + " ".join(map(str, range(1, i + 1)))} for i in range(2, 6)]
    trainer = DSV4SFTTrainer(
        str(checkpoint), args=_args(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
        peft_config=dsv4_lora_config(r=2, alpha=4),
    )  # fmt: skip
    tok = trainer.processing_class
    for row, sample in zip(rows, trainer.train_dataset):
        prompt = [tok.bos_token_id] + tok.encode(row["prompt"], add_special_tokens=False)
        completion = tok.encode(row["completion"], add_special_tokens=False) + [tok.eos_token_id]
        assert sample["input_ids"] == prompt + completion
        assert sample["labels"] == [-100] * len(prompt) + completion
    trainer.train()


def _first_step(checkpoint, out: Path, rows: list[dict], **overrides) -> tuple[DSV4SFTTrainer, float, float]:
    """A trainer after one step on `rows`, the step's logged loss, and the loss of its first batch's samples each
    run alone (one row each, before the step), per trained token."""
    trainer = DSV4SFTTrainer(
        str(checkpoint),
        args=_args(out, max_steps=1, logging_steps=1, **overrides),
        train_dataset=Dataset.from_list(rows),
        peft_config=dsv4_lora_config(r=4, alpha=8, targets="all"),
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in trainer.train_dataset:
            for ids, labels in _samples_of(sample):
                logits = trainer.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
                labels = torch.tensor(labels[1:])
                total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
    trainer.train()
    return trainer, next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry), total / count


def _samples_of(row: dict) -> list[tuple[list[int], list[int]]]:
    """The samples of a dataset row: the row, or the samples a packed row holds (`seq_lengths`)."""
    if "seq_lengths" not in row:
        return [(row["input_ids"], row["labels"])]
    out, start = [], 0
    for length in row["seq_lengths"]:
        out.append((row["input_ids"][start : start + length], row["labels"][start : start + length]))
        start += length
    return out


def test_packed_and_padding_free_steps_train_each_sample_as_alone(checkpoint, tmp_path):
    """Eight conversations (tool calls, thinking; 2837 tokens) in one step, padding-free (one row, positions
    restarting) and packed by TRL's BFD into one row of max_length 4096: the step's loss is the loss of the samples
    each run alone, per trained token as TRL normalises it, and both SGD steps leave the same LoRA weights, up to float32
    roundings at other matrix shapes (a few ulps; a packed sample's logits are < 1 ulp from its own, `test_packing`).
    (A padded batch is not exactly "alone" in stock either: the indexer's top-k breaks ties between ReLU scores of
    0 by the row's length, and the padded rows here pick other entries from token 107 on.)"""
    from numerics import ulps_off

    rows = _rows()
    free, got_free, alone_free = _first_step(
        checkpoint, tmp_path / "free", rows, per_device_train_batch_size=8, padding_free=True, optim="sgd"
    )
    packed, got_packed, alone_packed = _first_step(
        checkpoint, tmp_path / "packed", rows, per_device_train_batch_size=1, packing=True, max_length=4096, optim="sgd"
    )
    assert len(packed.train_dataset) == 1 and sorted(packed.train_dataset[0]["seq_lengths"]) == sorted(
        len(sample["input_ids"]) for sample in free.train_dataset
    )
    batch = next(iter(packed.get_train_dataloader()))
    assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) == 8
    assert free.args.max_length == 1024  # TRL takes none with padding_free; ours tokenizes to it (`overlong`)
    assert abs(alone_free - alone_packed) < 1e-12
    for got in (got_free, got_packed):
        assert ulps_off(torch.tensor(got), torch.tensor(alone_free, dtype=torch.float64)) <= 32, (got, alone_free)
    weights = {n: p.detach().double() for n, p in free.model.named_parameters() if p.requires_grad}
    worst = {n: ulps_off(p.detach(), weights[n]) for n, p in packed.model.named_parameters() if p.requires_grad}
    assert len(worst) > 40 and max(worst.values()) <= 32, max(worst.items(), key=lambda item: item[1])


def test_config_rejects_inexact_packing_and_unknown_options(tmp_path):
    """Packing needs hf_dsv4's attention (transformers' compressors read the whole row) and whole samples."""
    assert DSV4SFTConfig(output_dir=str(tmp_path), packing=True, report_to=[]).packing
    assert DSV4SFTConfig(output_dir=str(tmp_path), padding_free=True, report_to=[]).padding_free
    for flag in ("packing", "padding_free"):
        with pytest.raises(ValueError, match="needs sparse_attention=True"):
            DSV4SFTConfig(output_dir=str(tmp_path), sparse_attention=False, report_to=[], **{flag: True})
    with pytest.raises(ValueError, match="'wrapped' cuts samples"):
        DSV4SFTConfig(output_dir=str(tmp_path), packing=True, packing_strategy="wrapped", report_to=[])
    with pytest.raises(ValueError, match="turns"):
        DSV4SFTConfig(output_dir=str(tmp_path), turns="every", report_to=[])
    with pytest.raises(ValueError, match="overlong"):
        DSV4SFTConfig(output_dir=str(tmp_path), overlong="cut", report_to=[])


def test_the_effort_profile_is_read_from_the_checkpoint_and_used_for_template_and_labels(checkpoint, tmp_path, caplog):
    """--effort_profile auto (the default) on a checkpoint that ships the 0731 encoder: the trainer's template and
    its tokenized rows render the 0731 effort block ("max": the new text), and the choice is logged."""
    import logging
    import shutil

    from hf_dsv4.template import tokens as T

    model_dir = tmp_path / "ckpt_0731"
    shutil.copytree(checkpoint, model_dir)
    (model_dir / "encoding").mkdir()
    (model_dir / "encoding" / "encoding_dsv4.py").write_text(
        'REASONING_EFFORT_PROMPTS = {"low": "", "high": "h", "max": "m"}\nDEFAULT_REASONING_EFFORT = "low"\n'
    )
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    with caplog.at_level(logging.INFO, logger="hf_dsv4.training.trainer"):
        trainer = DSV4SFTTrainer(
            str(model_dir), args=_args(tmp_path / "out", max_steps=1, reasoning_effort="max"),
            train_dataset=Dataset.from_list(rows), peft_config=dsv4_lora_config(r=2, alpha=4),
        )  # fmt: skip
    assert trainer.args.effort_profile == "0731"
    assert f"effort profile 0731 (read from {model_dir})" in caplog.text
    tok = trainer.processing_class
    text = tok.decode(trainer.train_dataset[0]["input_ids"])
    assert T.REASONING_EFFORT_BEYOND_MAX_PREFIX in text
    assert tok.apply_chat_template(rows[0]["messages"], tokenize=False, reasoning_effort="max") == text
    given = DSV4SFTTrainer(
        str(model_dir), args=_args(tmp_path / "out2", max_steps=1, effort_profile="0424"),
        train_dataset=Dataset.from_list(rows), peft_config=dsv4_lora_config(r=2, alpha=4),
    )  # fmt: skip
    assert given.args.effort_profile == "0424"


def test_the_trainer_leaves_the_callers_config_and_callbacks_as_they_were(checkpoint, tmp_path):
    """The trainer settles the effort profile and assistant-only loss, and switches its DSV4Callback's own adapter
    saving off, on copies: the caller's objects (reused for a second trainer, say) are unchanged."""
    from hf_dsv4 import DSV4Callback

    args, callback = _args(tmp_path / "out", max_steps=1), DSV4Callback(save_adapter=True)
    before = args.to_dict()
    text_rows = Dataset.from_list([{"prompt": "Hi", "completion": " there"}] * 4)
    trainer = DSV4SFTTrainer(
        str(checkpoint), args=args, train_dataset=text_rows, callbacks=[callback],
        peft_config=dsv4_lora_config(r=2, alpha=4),
    )  # fmt: skip
    assert args.to_dict() == before and args.effort_profile == "auto" and args.assistant_only_loss
    assert trainer.args is not args and trainer.args.effort_profile == "0424" and not trainer.args.assistant_only_loss
    assert callback.save_adapter
    ours = [c for c in trainer.callback_handler.callbacks if isinstance(c, DSV4Callback)]
    assert len(ours) == 1 and ours[0] is not callback and not ours[0].save_adapter
