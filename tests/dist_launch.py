"""Start N real processes of `tests/dist_worker.py` (gloo, free port) and collect each rank's JSON result.

Used by the multi-process tests: every run has a timeout, so a hang in a collective fails the test instead of
blocking the suite, and both ranks are killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[1]


def exit_without_teardown() -> None:
    """End a test's rank process now, with status 0, once its results are written and its process group destroyed.

    Skips the interpreter's finalization: gloo's C++ worker threads can still be alive there and abort the process
    ("terminate called without an active exception", SIGABRT) after all its work is done: seen in CI on the `export`
    scenario (its result file written, exit status -6) and on the recipe."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(scenario: str, out_dir: Path, *args: str, world_size: int = 2, timeout: float = 120) -> list[dict]:
    """Run `dist_worker.py scenario out_dir *args` on `world_size` ranks; return each rank's result dict.

    Raises AssertionError with every rank's output if a rank exits non-zero, writes no result, or the run takes
    longer than `timeout` seconds.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = []
    for rank in range(world_size):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(WORKER), scenario, str(out_dir), *args]
        procs.append((subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    timed_out = False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logs = "\n".join(f"--- rank {r} ---\n{(out_dir / f'rank{r}.log').read_text()[-4000:]}" for r in range(world_size))
    if timed_out:
        raise AssertionError(f"{scenario} did not finish within {timeout} s\n{logs}")
    results = []
    for rank, (proc, _) in enumerate(procs):
        result = out_dir / f"rank{rank}.json"
        if proc.returncode != 0 or not result.exists():
            raise AssertionError(f"{scenario}: rank {rank} exited with {proc.returncode}\n{logs}")
        results.append(json.loads(result.read_text()))
    return results


class AccelerateRun:
    """`accelerate launch <launcher args> <script> <args>` started in the background (its own process group, output
    to `<log_dir>/<name>.log`); `wait()` kills the launcher and every rank it started after `timeout` seconds."""

    def __init__(
        self, name: str, launcher: list[str], script: str, args: list[str], log_dir: Path, env: dict | None = None
    ):
        self.name, self.log_path = name, log_dir / f"{name}.log"
        full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, script, *args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_dir
        )

    def wait(self, timeout: float = 600) -> int:
        """The exit status (-9 after a timeout)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def failure(self, why: str) -> AssertionError:
        return AssertionError(f"{self.name}: {why}, exit {self.proc.returncode}\n{self.log_path.read_text()[-8000:]}")
