"""A rank killed with SIGKILL (mid-run, and mid-checkpoint-save) ends the job on every rank, leaves no checkpoint that
looks complete but is not, and `--resume_from_checkpoint latest` continues from the newest complete one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dist_launch import AccelerateRun

from hf_dsv4.training.trainer import latest_complete_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = ["--config_file", str(REPO / "accelerate_configs" / "fsdp2_cpu_2proc.yaml")]
RECIPE = str(REPO / "tests" / "recipe_script.py")
DEMO = REPO / "recipes" / "data" / "dsv4_demo.jsonl"
STEPS, SAVE_EVERY = 8, 2


def args(model: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_name", str(DEMO), "--dtype", "float32",
            "--max_length", "96", "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--logging_steps", "1",
            "--per_device_train_batch_size", "1", "--report_to", "none", "--output_dir", str(output_dir), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def crashed(tiny_ckpt_fp32, tmp_path_factory) -> dict:
    """Rank 1 killed at the end of step 5, and (another run) inside the checkpoint save of step 6; then the second
    run resumed with `--resume_from_checkpoint latest`."""
    out = tmp_path_factory.mktemp("crash")
    runs = {
        name: AccelerateRun(name, CPU_2PROC, RECIPE, args(tiny_ckpt_fp32, out / name), out, {"HF_DSV4_KILL": kill})
        for name, kill in (("killed_mid_run", "1:5:step"), ("killed_mid_save", "1:6:save"))
    }
    results = {}
    for name, run in runs.items():
        start = time.monotonic()
        status = run.wait(240)
        folder = out / name
        results[name] = {
            "status": status, "seconds": time.monotonic() - start, "dir": folder,
            "finished": (folder / "test_result.json").exists(),
            "latest": latest_complete_checkpoint(folder),
            # name -> (adapter written, trainer_state written), as the crash left them (the resume rewrites them)
            "checkpoints": {p.name: ((p / "adapter_config.json").is_file(), (p / "trainer_state.json").is_file())
                            for p in sorted(folder.glob("checkpoint-*"))},
        }  # fmt: skip
    resumed = AccelerateRun("resumed", CPU_2PROC, RECIPE,
                            args(tiny_ckpt_fp32, out / "killed_mid_save", "--resume_from_checkpoint", "latest"), out)  # fmt: skip
    if resumed.wait(300) != 0:
        raise resumed.failure("the resumed run failed")
    results["resumed"] = {
        "log": resumed.log_path.read_text(),
        "result": json.loads((out / "killed_mid_save" / "test_result.json").read_text()),
    }
    return results


def test_a_killed_rank_ends_the_job_on_every_rank(crashed):
    for name in ("killed_mid_run", "killed_mid_save"):
        run = crashed[name]
        # the launcher itself ended the job with an error, well before this test's own 240 s kill (-9)
        assert run["status"] not in (0, -9), name
        assert run["seconds"] < 180, name
        assert not run["finished"]  # no rank finished


def test_only_finished_checkpoints_look_complete(crashed):
    mid_run = crashed["killed_mid_run"]
    assert mid_run["checkpoints"] == {"checkpoint-2": (True, True), "checkpoint-4": (True, True)}
    assert mid_run["latest"] == str(mid_run["dir"] / "checkpoint-4")
    mid_save = crashed["killed_mid_save"]
    # the save of step 6 wrote the adapter, then died: the folder exists but has no trainer_state.json
    assert mid_save["checkpoints"] == {
        "checkpoint-2": (True, True), "checkpoint-4": (True, True), "checkpoint-6": (True, False)
    }  # fmt: skip
    assert mid_save["latest"] == str(mid_save["dir"] / "checkpoint-4")


def test_resume_latest_continues_from_the_newest_complete_checkpoint(crashed):
    resumed = crashed["resumed"]
    assert "resuming from " in resumed["log"] and "checkpoint-4\n" in resumed["log"]
    steps = [e["step"] for e in resumed["result"]["log_history"] if "loss" in e]
    assert steps[-1] == STEPS and set(range(5, STEPS + 1)) <= set(steps)
