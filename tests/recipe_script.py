"""Runs `recipes/sft_dsv4.py` as `accelerate launch` would, for the tests: same arguments, plus
`HF_DSV4_STOP_AT=k` (end training after step k, as an interrupted run), `HF_DSV4_KILL=<rank>:<step>:step|save`
(SIGKILL that rank at the end of that step, or in the middle of that step's checkpoint save, after the adapter and
before the optimizer state and trainer_state.json), `HF_DSV4_HUB_CAPTURE=<folder>` (pushes are
intercepted and every committed file written under `<folder>/commit-<n>/`, see hub_capture.py),
`HF_DSV4_RECORD_SAVES=1` (the collectives of every `save_model` and optimizer save, keyed by method and folder name, in
`<output_dir>/collectives_rank<r>.json`, see collectives.py) and a JSON dump of the log history on rank 0
(`<output_dir>/test_result.json`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from dist_launch import exit_without_teardown
from hub_capture import capture_hub_commits
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import sft_dsv4  # noqa: E402


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of step `step` (a crash: no exception, no cleanup)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(step: int) -> None:
    """SIGKILL this process inside the checkpoint save of `step`, once the adapter is written."""
    from hf_dsv4.training.trainer import DSV4SFTTrainer

    original = DSV4SFTTrainer._save_optimizer_and_scheduler

    def dying(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    DSV4SFTTrainer._save_optimizer_and_scheduler = dying


def record_saves() -> dict:
    """Record what each save sends: {"<method>:<folder name>": {"floating_elements": n, "summary": {...}}}."""
    from collectives import CollectiveRecorder

    from hf_dsv4.training.trainer import DSV4SFTTrainer

    records = {}

    def recorded(method: str):
        original = getattr(DSV4SFTTrainer, method)

        def save(self, output_dir=None, *args, **kwargs):
            with CollectiveRecorder() as recorder:
                returned = original(self, output_dir, *args, **kwargs)
            name = Path(output_dir if output_dir is not None else self.args.output_dir).name
            records[f"{method}:{name}"] = {
                "floating_elements": recorder.floating_elements(),
                "summary": recorder.summary(),
            }
            return returned

        setattr(DSV4SFTTrainer, method, save)

    recorded("save_model")
    recorded("_save_optimizer_and_scheduler")
    return records


def _mesh_of(model) -> dict | None:
    """The device mesh and placements of the model's first sharded parameter (None when nothing is sharded)."""
    from torch.distributed.tensor import DTensor

    for param in model.parameters():
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            return {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names or ()),
                    "placements": [str(p) for p in param.placements]}  # fmt: skip
    return None


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


if __name__ == "__main__":
    script_args, training_args, model_args = sft_dsv4.parse_args()
    stop = os.environ.get("HF_DSV4_STOP_AT")
    callbacks = [StopAt(int(stop))] if stop else []
    if os.environ.get("HF_DSV4_KILL"):
        kill_rank, kill_step, where = os.environ["HF_DSV4_KILL"].split(":")
        if int(os.environ["RANK"]) == int(kill_rank):
            if where == "save":
                kill_during_save(int(kill_step))
            else:
                callbacks.append(KillAt(int(kill_step)))
    records = record_saves() if os.environ.get("HF_DSV4_RECORD_SAVES") else None
    capture = os.environ.get("HF_DSV4_HUB_CAPTURE")
    with capture_hub_commits([], Path(capture)) if capture else contextlib.nullcontext():
        trainer = sft_dsv4.main(script_args, training_args, model_args, callbacks=callbacks or None)
    if trainer.is_world_process_zero():
        result = {
            "log_history": trainer.state.log_history,
            "world_size": trainer.args.world_size,
            "is_fsdp_enabled": trainer.is_fsdp_enabled,
            "sharded": trainer.is_dsv4_sharded,
            "mesh": _mesh_of(trainer.model),
        }
        (Path(training_args.output_dir) / "test_result.json").write_text(json.dumps(result))
    if records is not None:
        rank = trainer.args.process_index
        (Path(training_args.output_dir) / f"collectives_rank{rank}.json").write_text(json.dumps(records))
    print(f"recipe_script: rank {trainer.args.process_index} finished", flush=True)  # each rank's output is in the log
    exit_without_teardown()
