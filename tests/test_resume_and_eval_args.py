"""What `--resume_from_checkpoint true|latest` resumes from, and where the recipe's evaluation data comes from."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import import_recipe

from hf_dsv4.training.trainer import latest_complete_checkpoint, resolve_resume_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """checkpoint-4 and -6 complete, checkpoint-8 interrupted (no trainer_state.json), and two look-alikes."""
    for step in (4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 8:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10x").mkdir()
    (tmp_path / "checkpoint-12.tmp").mkdir()
    return tmp_path


def test_the_newest_complete_checkpoint_is_chosen_and_an_interrupted_one_skipped(output_dir):
    assert latest_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-6")
    for value in ("true", "True", "latest", "last", True):
        assert resolve_resume_from_checkpoint(value, output_dir) == str(output_dir / "checkpoint-6")
    assert resolve_resume_from_checkpoint(str(output_dir / "checkpoint-4"), output_dir) == str(
        output_dir / "checkpoint-4"
    )
    for value in (None, False, "false"):
        assert resolve_resume_from_checkpoint(value, output_dir) is None


def test_resuming_latest_with_no_complete_checkpoint_says_where_it_looked(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()  # interrupted
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint-N folder \(one with trainer_state.json\) in "):
        resolve_resume_from_checkpoint("latest", tmp_path)
    assert latest_complete_checkpoint(tmp_path / "missing") is None


@pytest.fixture(scope="module")
def recipe():
    return import_recipe("sft_dsv4")


def test_a_local_dataset_needs_an_eval_file_when_evaluating(recipe):
    script_args, training_args, _ = recipe.parse_args(["--eval_strategy", "steps", "--eval_steps", "2"])
    with pytest.raises(ValueError, match="give --eval_dataset_name <file>"):
        recipe.load_eval_dataset(script_args, training_args)
    script_args, training_args, _ = recipe.parse_args([])
    assert recipe.load_eval_dataset(script_args, training_args) is None  # no evaluation asked


def test_an_eval_file_is_loaded_as_the_test_split(recipe):
    argv = ["--eval_strategy", "steps", "--eval_steps", "2", "--eval_dataset_name", "recipes/data/dsv4_demo.jsonl"]
    script_args, training_args, _ = recipe.parse_args(argv)
    dataset = recipe.load_eval_dataset(script_args, training_args)
    assert dataset.split == "test" and len(dataset) == 48 and dataset.column_names == ["messages", "tools"]
    script_args.eval_dataset_name = "no/such/file.jsonl"
    with pytest.raises(FileNotFoundError, match="--eval_dataset_name no/such/file.jsonl: no such file"):
        recipe.load_eval_dataset(script_args, training_args)


def test_a_meta_model_outside_an_fsdp_launch_is_refused_with_what_to_do(tmp_path):
    import torch
    from transformers import DeepseekV4ForCausalLM

    from hf_dsv4 import DSV4SFTConfig, DSV4SFTTrainer
    from hf_dsv4.testing import tiny_dsv4_config, tiny_tokenizer

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(tiny_dsv4_config())
    args = DSV4SFTConfig(tmp_path, report_to="none", max_steps=1)
    with pytest.raises(ValueError, match=r"^rank 0: the model is on the meta device .* launch with an FSDP accelerate"):
        DSV4SFTTrainer(model, args=args, processing_class=tiny_tokenizer())


def test_a_cpu_machine_needs_no_device_or_precision_flag_and_float32_weights_compute_in_float32(tmp_path, recipe):
    from hf_dsv4 import DSV4SFTConfig

    args = DSV4SFTConfig(tmp_path, report_to="none")  # no use_cpu, no bf16: TrainingArguments would refuse bf16
    assert args.use_cpu and args.bf16  # TRL's default precision (CPU autocast)
    assert DSV4SFTConfig(tmp_path, report_to="none", model_init_kwargs={"dtype": "float32"}).bf16 is False
    assert DSV4SFTConfig(tmp_path, report_to="none", model_init_kwargs={"dtype": "float32"}, bf16=True).bf16
    argv = [
        "--model_name_or_path",
        "m",
        "--dataset_name",
        "d.jsonl",
        "--dtype",
        "float32",
        "--output_dir",
        str(tmp_path),
    ]
    _, training_args, _ = recipe.parse_args(argv)
    assert training_args.bf16 is False and training_args.use_cpu
    _, training_args, _ = recipe.parse_args([*argv, "--bf16", "true"])
    assert training_args.bf16 is True


def test_the_flash_recipe_config_streams_the_release_on_every_rank_within_a_budget(recipe):
    """recipes/configs/dsv4_flash_lora.yaml parses with the recipe's own parser into the loading it documents."""
    config = str(REPO / "recipes" / "configs" / "dsv4_flash_lora.yaml")
    script_args, training_args, model_args = recipe.parse_args(["--config", config, "--dataset_name", "x/y"])
    assert model_args.model_name_or_path == "deepseek-ai/DeepSeek-V4-Flash"
    assert training_args.stream_weights and training_args.stream_readers == "all"
    assert training_args.stream_read_budget_mb == 2048
    assert training_args.keep_quantized and training_args.quantized_experts == "per_expert"
    with pytest.raises(SystemExit):  # a reader that does not exist is refused by the parser
        recipe.parse_args(["--config", config, "--dataset_name", "x/y", "--stream_readers", "rank1"])
