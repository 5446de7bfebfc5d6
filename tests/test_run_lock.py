"""One trainer per run folder: a second `train` on a folder another trainer holds is refused at once, and
writes nothing; the lock goes with the process that held it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from sftbridge.errors import RunDirError
from sftbridge.runs import run_lock


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "one"
    with run_lock(run_dir):
        with pytest.raises(RunDirError) as refused, run_lock(run_dir):
            pass
        assert str(refused.value) == (
            f"{run_dir}: another training run (pid {os.getpid()}) is writing this run folder; wait for it to "
            "end, or choose another --run-dir"
        )
    with run_lock(run_dir):  # released: taken again
        pass


def test_a_second_trainer_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "busy"
    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    with run_lock(run_dir):  # as a first `sftbridge train --run-dir` holds it while its job runs
        cli = run_cli("train", config, "--run-dir", str(run_dir))
        script = subprocess.run(
            [sys.executable, "-m", "sftbridge.training.train", "--config", config, "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "SFTBRIDGE_SUPERVISED"},
        )
    expected = f"error: {run_dir}: another training run (pid {os.getpid()}) is writing this run folder"
    for result in (cli, script):
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.startswith(expected), result.stderr[-2000:]
    assert list(run_dir.parent.iterdir()) == []  # no run, no checkpoints, and the lock went with its holder
