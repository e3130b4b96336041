"""The README.md written next to a trained DeepSeek-V4 adapter: PEFT metadata, what/on what/how, results, a quick
start that runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from hf_dsv4 import DSV4SFTConfig, DSV4SFTTrainer, dsv4_lora_config
from hf_dsv4.training.lora import LORA_TARGETS
from hf_dsv4.training.model_card import adaptation, base_license, base_reference, dataset_reference, loss_table

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]}
        for i in range(8)]  # fmt: skip


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def train(base: Path, out: Path, **overrides) -> DSV4SFTTrainer:
    args = DSV4SFTConfig(out, max_steps=4, logging_steps=1, save_steps=2, report_to="none", use_cpu=True,
                         bf16=False, per_device_train_batch_size=2, learning_rate=5e-3, **overrides)  # fmt: skip
    trainer = DSV4SFTTrainer(
        str(base), args=args, train_dataset=Dataset.from_list(ROWS),
        peft_config=dsv4_lora_config(r=4, alpha=8, targets="attention+shared"),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    return trainer


@pytest.fixture(scope="module")
def local_run(tiny_ckpt_fp32, tmp_path_factory) -> tuple[DSV4SFTTrainer, str]:
    trainer = train(tiny_ckpt_fp32, tmp_path_factory.mktemp("card_local"))
    trainer.create_model_card(dataset_name="acme/dsv4-chats")
    return trainer, (Path(trainer.args.output_dir) / "README.md").read_text()


@pytest.fixture(scope="module")
def cached_run(tiny_ckpt_fp32, tmp_path_factory) -> tuple[DSV4SFTTrainer, str]:
    """The base loaded from a Hugging Face cache snapshot of `acme/tiny-dsv4`, whose own card says `license: mit`."""
    snapshot = tmp_path_factory.mktemp("hub") / "models--acme--tiny-dsv4" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_ckpt_fp32, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    out = tmp_path_factory.mktemp("card_hub")
    trainer = train(snapshot, out, hub_model_id="acme/tiny-dsv4-lora")
    return trainer, (out / "README.md").read_text()


def test_a_hub_base_is_linked_as_the_adapters_base_with_its_license(cached_run):
    _, card = cached_run
    assert front_matter(card) == {
        "base_model": "acme/tiny-dsv4", "base_model_relation": "adapter", "library_name": "peft", "license": "mit",
        "model_name": "tiny-dsv4-lora", "pipeline_tag": "text-generation",
        "tags": ["deepseek-v4", "hf_dsv4", "lora", "sft", "trl"],
    }  # fmt: skip
    assert "trained from [acme/tiny-dsv4](https://huggingface.co/acme/tiny-dsv4)" in card
    assert "from_pretrained('acme/tiny-dsv4', dtype=torch.bfloat16)\n" in card
    assert "PeftModel.from_pretrained(base, 'acme/tiny-dsv4-lora')" in card
    assert "None" not in card.split("## Training")[0]


def test_a_local_base_is_named_in_the_text_and_left_out_of_the_metadata(local_run, tiny_ckpt_fp32):
    trainer, card = local_run
    meta = front_matter(card)
    assert "base_model" not in meta and "license" not in meta
    assert meta["library_name"] == "peft" and meta["datasets"] == ["acme/dsv4-chats"]
    assert f"trained from a local checkpoint (`{tiny_ckpt_fp32.name}`, not on the Hub)" in card
    assert "[None]" not in card and 'model="None"' not in card


def test_the_body_says_what_was_trained_on_what_and_how(local_run):
    trainer, card = local_run
    assert "- Adaptation: LoRA, rank 4, alpha 8, dropout 0.0, on the `attention+shared` preset" in card
    tokens = sum(label != -100 for row in trainer.train_dataset["labels"] for label in row)
    assert f"- Data: [acme/dsv4-chats](https://huggingface.co/datasets/acme/dsv4-chats); 8 training samples, " \
           f"{tokens:,} trained (assistant) tokens per epoch" in card  # fmt: skip
    assert "thinking mode `thinking`, turns `all`, earlier reasoning dropped" in card
    assert "learning rate 0.005, linear schedule" in card
    assert (
        "- Batch: 2 per device x 1 accumulation steps x 1 process = 2 samples per step; 4 steps (1.00 epochs)" in card
    )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    table = card.split("## Results")[1]
    assert [float(x) for x in re.findall(r"^\| \d+ \| ([\d.]+) \|$", table, re.M)] == [round(x, 4) for x in losses]


def test_the_quick_start_in_the_card_runs(local_run, capsys):
    _, card = local_run
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    capsys.readouterr()
    exec(compile(code, "README.md quick start", "exec"), {})  # noqa: S102 - the card's own code, as a user runs it
    printed = capsys.readouterr().out
    assert printed.startswith("{'role': 'assistant'")


def test_the_serving_commands_of_the_card_are_the_readmes_and_run(local_run, tiny_ckpt_fp32, tmp_path):
    """The card says what the README says (vLLM needs `hf_dsv4.export`, a merge `hf_dsv4.merge`), and both commands,
    as written there with the adapter and the base it names, run (here through their Python functions)."""
    from hf_dsv4 import export_adapter, merge_adapter

    trainer, card = local_run
    folder, base = str(Path(trainer.args.output_dir).resolve()), str(tiny_ckpt_fp32)
    export = re.search(r"`python -m hf_dsv4\.export (\S+) <out>`", card)
    merge = re.search(r"`python -m hf_dsv4\.merge (\S+) (\S+) <out>`", card)
    assert export and merge and "merge_and_unload" not in card and "any engine that supports PEFT" not in card
    assert export[1] == folder and merge.groups() == (base, folder)
    assert (export_adapter(export[1], tmp_path / "vllm") / "adapter_model.safetensors").is_file()
    assert (merge_adapter(merge[1], merge[2], tmp_path / "merged") / "config.json").is_file()


def test_full_fine_tuning_gets_a_transformers_card_whose_quick_start_runs(tiny_ckpt_fp32, tmp_path, capsys):
    args = DSV4SFTConfig(tmp_path / "full", max_steps=2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                         per_device_train_batch_size=2, learning_rate=1e-4)  # fmt: skip
    trainer = DSV4SFTTrainer(str(tiny_ckpt_fp32), args=args, train_dataset=Dataset.from_list(ROWS))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "full" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "full-fine-tuning" in meta["tags"] and "lora" not in meta["tags"]
    assert card.count("# A fully fine-tuned model") == 0 and "A fully fine-tuned model for DeepSeek-V4" in card
    assert "- Adaptation: full fine-tuning (every parameter)." in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "PeftModel" not in code
    capsys.readouterr()  # the training logs so far
    exec(compile(code, "README.md quick start", "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.startswith("{'role': 'assistant'")


def test_base_references():
    cache = "/root/.cache/huggingface/hub/models--deepseek-ai--DeepSeek-V4-Flash/snapshots/abc/"
    assert base_reference(cache)[0] == "deepseek-ai/DeepSeek-V4-Flash"
    assert base_reference("deepseek-ai/DeepSeek-V4-Flash")[0] == "deepseek-ai/DeepSeek-V4-Flash"
    assert base_reference(None) == (None, "an unnamed base model")
    assert base_reference("not a hub id")[0] is None
    assert dataset_reference("trl-lib/Capybara")[0] == "trl-lib/Capybara"
    assert dataset_reference(None) == (None, "a dataset passed in Python")
    assert dataset_reference("recipes/data/dsv4_demo.jsonl") == (None, "a local dataset (`dsv4_demo.jsonl`)")


def test_the_license_comes_from_a_local_copy_of_the_base_card_only(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert base_license(str(tmp_path), None) == "apache-2.0"
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert base_license(str(tmp_path), None) is None
    assert base_license("acme/not-in-the-cache-" + tmp_path.name, "acme/not-in-the-cache-" + tmp_path.name) is None


def test_adaptation_names_presets_explicit_targets_and_full_fine_tuning():
    for name in LORA_TARGETS:
        assert f"on the `{name}` preset" in adaptation(dsv4_lora_config(r=8, alpha=16, targets=name))
    explicit = adaptation(dsv4_lora_config(r=2, alpha=4, targets=["q_a_proj", "kv_proj"]))
    assert explicit == "LoRA, rank 2, alpha 4, dropout 0.0, on `kv_proj, q_a_proj`"
    assert adaptation(None) == "full fine-tuning (every parameter)"


def test_the_loss_table_spreads_20_training_rows_and_adds_every_eval_step():
    history = [{"step": s, "loss": 10 / s} for s in range(1, 101)] + [{"step": 50, "eval_loss": 0.5}]
    rows = loss_table(history).splitlines()
    assert rows[:2] == ["| step | training loss | eval loss |", "| ---: | ---: | ---: |"]
    assert len(rows[2:]) == 21 and rows[2] == "| 1 | 10.0000 |  |" and rows[-1] == "| 100 | 0.1000 |  |"
    assert "| 50 | 0.2000 | 0.5000 |" in rows
    assert loss_table([{"step": 1, "loss": 2.0}]).splitlines() == [
        "| step | training loss |",
        "| ---: | ---: |",
        "| 1 | 2.0000 |",
    ]
    assert loss_table([]) == "No loss was logged."
