"""Secrets never leave the process: the hub token is in no file the run writes, nothing it pushes, no log line of any
rank, no repr; and what hf_dsv4 reads it does not execute or unpickle blindly."""

from __future__ import annotations

import ast
import copy
import io
import json
import secrets
from pathlib import Path

import pytest
import torch
from dist_launch import AccelerateRun
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import hf_dsv4
from hf_dsv4 import DSV4SFTConfig, install_chat_template, memory_efficient_init

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml")]
RECIPE = str(REPO / "tests" / "recipe_script.py")
DEMO = REPO / "recipes" / "data" / "dsv4_demo.jsonl"
# new for every session, so a hit can only come from this run
FLAG_SECRET = "hf_" + secrets.token_hex(16)  # --hub_token
ENV_SECRET = "hf_" + secrets.token_hex(16)  # HF_TOKEN in every rank's environment
SECRETS = (FLAG_SECRET.encode(), ENV_SECRET.encode())


def holders(paths) -> list[str]:
    """The files among `paths` whose bytes contain a secret."""
    return [str(p) for p in paths if p.is_file() and any(s in p.read_bytes() for s in SECRETS)]


def config(**kwargs) -> DSV4SFTConfig:
    return DSV4SFTConfig("unused", report_to="none", use_cpu=True, bf16=False, **kwargs)


# ------------------------------------------------------------------------------------------------- in process


def test_repr_and_str_mask_the_hub_token():
    args = config(hub_token=FLAG_SECRET)
    for text in (repr(args), str(args), f"{args}", json.dumps(args.to_dict())):
        assert FLAG_SECRET not in text
    assert "hub_token=<HUB_TOKEN>," in repr(args) and args.hub_token == FLAG_SECRET


def test_pickled_config_leaves_the_token_out_and_copies_keep_it():
    args = config(hub_token=FLAG_SECRET, turns="last", max_length=123)
    buffer = io.BytesIO()
    torch.save(args, buffer)  # what the Trainer writes as training_args.bin
    assert FLAG_SECRET.encode() not in buffer.getvalue()
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is DSV4SFTConfig and loaded.hub_token is None
    assert (loaded.turns, loaded.max_length, loaded.output_dir) == ("last", 123, "unused")
    assert copy.deepcopy(args).hub_token == copy.copy(args).hub_token == FLAG_SECRET  # a push still has its token


def test_the_scan_finds_a_token_pickled_by_the_stock_arguments(tmp_path):
    """The control for the run tests below: stock `TrainingArguments` pickle the token in clear, and the scan sees it."""
    torch.save(TrainingArguments(tmp_path, hub_token=FLAG_SECRET, use_cpu=True, report_to="none"), tmp_path / "a.bin")
    assert holders([tmp_path / "a.bin"]) == [str(tmp_path / "a.bin")]


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == name
    ]  # fmt: skip


SOURCES = sorted(Path(hf_dsv4.__file__).parent.rglob("*.py"))


def test_hf_dsv4_never_unpickles_a_file_without_weights_only_and_never_executes_code():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for call in calls(tree, "load"):
            if ast.unparse(call.func) in ("torch.load", "pickle.load"):
                keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
                assert keywords.get("weights_only") == "True", f"{path}:{call.lineno}"
        builtins = [c.func.id for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        assert not {"exec", "eval", "compile", "__import__"} & set(builtins), path
        for name in ("spec_from_file_location", "run_path", "SourceFileLoader"):
            assert not calls(tree, name), f"{path}: {name}"
        # pickle.loads only on what another rank of this job sent (hf_dsv4.distributed), never on a file
        if calls(tree, "loads") and "pickle" in path.read_text():
            assert path.name == "distributed.py", path


def test_trust_remote_code_is_off_unless_asked():
    assert config().trust_remote_code is False


def test_loading_a_checkpoint_never_runs_its_python_files(tiny_ckpt, tmp_path):
    """A release checkpoint ships DeepSeek's encoder as `encoding/encoding_dsv4.py`: hf_dsv4 renders the format itself
    and never imports it (nor any other Python file in the checkpoint)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for file in tiny_ckpt.iterdir():
        (ckpt / file.name).symlink_to(file)
    marker = tmp_path / "executed"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (ckpt / "encoding").mkdir()
    (ckpt / "encoding" / "encoding_dsv4.py").write_text(payload)
    (ckpt / "encoding" / "__init__.py").write_text(payload)
    with memory_efficient_init():
        AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    install_chat_template(AutoTokenizer.from_pretrained(ckpt))
    assert not marker.exists()


# ------------------------------------------------------------------------------------- the recipe on 2 ranks


@pytest.fixture(scope="module")
def runs(tiny_ckpt_fp32, tmp_path_factory) -> dict[str, dict]:
    """LoRA and full fine-tuning on 2 ranks, each with --hub_token, HF_TOKEN, a checkpoint every step and a push after
    each save (hub_strategy every_save) and at the end, intercepted; INFO logs on every rank."""
    out = tmp_path_factory.mktemp("secrets")
    common = ["--model_name_or_path", str(tiny_ckpt_fp32), "--dataset_name", str(DEMO), "--dtype", "float32",
              "--bf16", "false", "--use_cpu", "true", "--max_length", "128", "--max_steps", "2", "--save_steps", "1",
              "--logging_steps", "1", "--per_device_train_batch_size", "1", "--report_to", "none",
              "--log_level", "info", "--log_level_replica", "info", "--push_to_hub", "true",
              "--hub_model_id", "acme/dsv4-secret-test", "--hub_token", FLAG_SECRET]  # fmt: skip
    started = {}
    for name, extra in (("lora", []), ("full", ["--use_peft", "false"])):
        env = {"HF_TOKEN": ENV_SECRET, "HF_DSV4_HUB_CAPTURE": str(out / f"{name}_pushed")}
        args = [*common, *extra, "--output_dir", str(out / name)]
        started[name] = AccelerateRun(name, CPU_2PROC, RECIPE, args, out, env)
    results = {}
    for name, run in started.items():
        if run.wait(600) != 0:
            raise run.failure("the run failed")
        results[name] = {"output": out / name, "pushed": out / f"{name}_pushed", "log": run.log_path}
    return results


@pytest.mark.parametrize("name", ["lora", "full"])
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_file_the_run_writes_holds_a_secret(runs, name):
    output = runs[name]["output"]
    written = sorted(output.rglob("*"))
    args_files = [p for p in written if p.name == "training_args.bin"]
    assert {p.parent.name for p in args_files} == {output.name, "checkpoint-1", "checkpoint-2"}
    assert holders(written) == []
    for path in args_files:  # written from the config with the token left out; the rest is there
        loaded = torch.load(path, weights_only=False)
        assert loaded.hub_token is None and loaded.hub_model_id == "acme/dsv4-secret-test"


@pytest.mark.parametrize("name", ["lora", "full"])
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nothing_pushed_holds_a_secret(runs, name):
    commits = sorted(runs[name]["pushed"].iterdir())
    pushed = sorted(p for commit in commits for p in commit.rglob("*") if p.is_file())
    assert len(commits) >= 2  # pushes from the checkpoints and the final one
    names = {p.name for p in pushed}
    # full fine-tuning under SHARDED_STATE_DICT: the model written rank by rank, several files and their index
    weights = "adapter_model.safetensors" if name == "lora" else "model.safetensors.index.json"
    assert {"training_args.bin", "README.md", weights} <= names, names
    assert holders(pushed) == []


@pytest.mark.parametrize("name", ["lora", "full"])
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_log_line_of_any_rank_holds_a_secret(runs, name):
    log = runs[name]["log"].read_bytes()  # stdout and stderr of the launcher and both ranks, INFO level
    assert b"recipe_script: rank 0 finished" in log and b"recipe_script: rank 1 finished" in log
    assert b"INFO hf_dsv4.loading.pretrained: rank 0 built the model on meta; shard_model streams" in log
    assert holders([runs[name]["log"]]) == []
