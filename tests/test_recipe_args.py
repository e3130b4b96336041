"""The recipe's one parse (TRL's `TrlParser`, command line over the `--config` YAML): the model's settings reach
`model_init_kwargs`, and `DSV4SFTConfig`'s rule decides the compute precision from them (float32 weights: no bf16
unless `--bf16`/`--fp16` is given, on the command line or in the YAML)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
import sft_dsv4  # noqa: E402

GIVEN = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--report_to", "none"]


@pytest.mark.parametrize(
    ("flags", "bf16", "dtype"),
    [
        ([], True, "bfloat16"),
        (["--dtype", "float32"], False, "float32"),
        (["--dtype", "float32", "--bf16", "true"], True, "float32"),
        (["--dtype", "float32", "--fp16", "true"], False, "float32"),
        (["--dtype", "bfloat16", "--bf16", "false"], False, "bfloat16"),
    ],
)
def test_float32_weights_compute_in_float32_unless_a_precision_is_given(tmp_path, flags, bf16, dtype):
    _, args, model_args = sft_dsv4.parse_args([*GIVEN, "--output_dir", str(tmp_path), *flags])
    assert (args.bf16, model_args.dtype, args.model_init_kwargs["dtype"]) == (bf16, dtype, dtype)
    assert args.mixed_precision == ("bf16" if bf16 else "fp16" if "--fp16" in flags else "no")


def test_a_yaml_precision_counts_as_given_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: {tmp_path}\ndtype: float32\nbf16: true\n"
    )
    assert sft_dsv4.parse_args(["--config", str(config)])[1].bf16 is True
    assert sft_dsv4.parse_args(["--config", str(config), "--bf16", "false"])[1].bf16 is False


def test_no_model_and_no_config_is_the_tiny_default():
    script_args, args, model_args = sft_dsv4.parse_args([])
    assert (script_args.dataset_name, args.output_dir, args.max_steps) == (
        "recipes/data/dsv4_demo.jsonl",
        "outputs/sft_dsv4_tiny",
        30,
    )
    assert (args.bf16, args.model_init_kwargs["dtype"], model_args.model_name_or_path) == (False, "float32", None)
