"""Runs `recipes/sft_dsv4.py` as `accelerate launch` would, for the tests: same arguments, plus
`HF_DSV4_STOP_AT=k` (end training after step k, as an interrupted run), `HF_DSV4_HUB_CAPTURE=<folder>` (pushes are
intercepted and every committed file written under `<folder>/commit-<n>/`, see hub_capture.py) and a JSON dump of the
log history and the trained adapter's names on rank 0 (`<output_dir>/test_result.json`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from hub_capture import capture_hub_commits
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import sft_dsv4  # noqa: E402


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


if __name__ == "__main__":
    script_args, training_args, model_args = sft_dsv4.parse_args()
    stop = os.environ.get("HF_DSV4_STOP_AT")
    capture = os.environ.get("HF_DSV4_HUB_CAPTURE")
    with capture_hub_commits([], Path(capture)) if capture else contextlib.nullcontext():
        trainer = sft_dsv4.main(script_args, training_args, model_args, callbacks=[StopAt(int(stop))] if stop else None)
    if trainer.is_world_process_zero():
        result = {
            "log_history": trainer.state.log_history,
            "world_size": trainer.args.world_size,
            "is_fsdp_enabled": trainer.is_fsdp_enabled,
            "sharded": trainer.is_dsv4_sharded,
        }
        (Path(training_args.output_dir) / "test_result.json").write_text(json.dumps(result))
    print(f"recipe_script: rank {trainer.args.process_index} finished", flush=True)  # each rank's output is in the log
