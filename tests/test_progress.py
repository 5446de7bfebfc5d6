"""What a run shows while it runs: a bar on a terminal (tested in a real pseudo-terminal), one line per log
through a pipe, and a metrics.jsonl that grows as training logs and outlives a SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import ROOT
from sftbridge.config import dump_config
from sftbridge.environment import TTY as TTY_ENV
from sftbridge.runs import METRICS, MetricsLog, checkpoint_dir_for, load_manifest
from sftbridge.training.progress import Progress, terminal_is_tty

TRAIN_LINE = re.compile(
    r"^\[train\] step=(\d+)/(\d+) epoch=[\d.]+ loss=[\d.e+-]+ lr=[\d.e+-]+ grad_norm=[\d.e+-]+ "
    r"tokens/s=\d+ .*eta=\d+:\d\d:\d\d$"
)


def script_command(config: Any, tmp_path: Path, run_dir: Path) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    return [
        sys.executable,
        "-m",
        "sftbridge.training.train",
        "--config",
        str(path),
        "--run-dir",
        str(run_dir),
    ]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TTY_ENV}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def state(step: int, max_steps: int = 100) -> Any:
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)


def test_tty_is_the_users_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local backend says what its own stdout is; without it, this process's stderr decides."""
    monkeypatch.setenv(TTY_ENV, "1")
    assert terminal_is_tty() is True
    monkeypatch.setenv(TTY_ENV, "0")
    assert terminal_is_tty() is False
    monkeypatch.delenv(TTY_ENV)
    assert terminal_is_tty() is sys.stderr.isatty()


def test_lines_and_metrics_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every log is one line and one flushed metrics.jsonl record with its own time; extra keys the trainer
    logs (answer_exact_match) appear on both without being declared anywhere."""
    clock = iter([1000.0, 1010.0, 1020.0, 1030.0, 1040.0, 1050.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    progress = Progress(tmp_path / METRICS, tty=False)
    progress.on_train_begin(None, state(10), None)  # resumed at step 10: the ETA counts this session's steps
    train_log = {"loss": 1.5, "grad_norm": 0.25, "learning_rate": 2e-5, "num_tokens": 5000.0, "epoch": 0.5}
    progress.on_log(None, state(20), None, logs=train_log)
    progress.on_log(
        None, state(30), None, logs={"eval_loss": 1.25, "eval_answer_exact_match": 0.5, "epoch": 1.0}
    )
    progress.on_log(
        None, state(30), None, logs={**train_log, "num_tokens": 9000.0, "answer_exact_match": 0.75}
    )
    progress.on_log(None, state(30), None, logs={"answer_eos_rate": 1.0, "epoch": 1.0})
    progress.on_log(None, state(30), None, logs={"train_runtime": 9.5, "train_loss": 1.5, "epoch": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[train] step=20/100 epoch=0.5 loss=1.5 lr=2e-05 grad_norm=0.25 tokens/s=500 eta=0:01:20",
        "[eval] step=30/100 epoch=1 eval_loss=1.25 eval_answer_exact_match=0.5",
        "[train] step=30/100 epoch=0.5 loss=1.5 lr=2e-05 grad_norm=0.25 tokens/s=200 answer_exact_match=0.75 "
        "eta=0:01:45",  # 20 steps in 30 s: 1.5 s a step, 70 to go
        "[metrics] step=30/100 epoch=1 answer_eos_rate=1",
        "[done] step=30/100 epoch=1 train_runtime=9.5 train_loss=1.5",
    ]
    records = MetricsLog(tmp_path / METRICS).read()
    assert [(r["time"], r["step"], r.get("tokens_per_second")) for r in records] == [
        (1010.0, 20, 500.0),
        (1020.0, 30, None),
        (1030.0, 30, 200.0),
        (1040.0, 30, None),
        (1050.0, 30, None),
    ]
    assert records[2]["answer_exact_match"] == 0.75 and records[1]["eval_loss"] == 1.25


def test_restart_at_drops_what_a_resumed_run_trains_again(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / METRICS)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0})
    log.write({"step": 4, "train_runtime": 9.0})  # the summary of the attempt that stopped
    with log.path.open("a") as handle:
        handle.write('{"step": 5, "lo')  # cut short by a kill
    log.restart_at(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    log.restart_at(0)
    assert log.read() == []


@pytest.mark.slow
def test_piped_run_prints_lines_and_a_killed_run_keeps_its_metrics(tiny_config: Any, tmp_path: Path) -> None:
    """Through a pipe: lines, never a bar. SIGKILL midway: metrics.jsonl (beside the checkpoints) holds every
    step the run logged, each with its own time."""
    config = tiny_config(train__max_steps=200, train__save_steps=100)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        script_command(config, tmp_path, run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=environment(),
        cwd=ROOT,
    )
    assert process.stdout is not None
    lines: list[bytes] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if sum(line.startswith(b"[train] ") for line in lines) == 3:
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    train_lines = [line.decode().rstrip("\n") for line in lines if line.startswith(b"[train] ")]
    assert all(TRAIN_LINE.match(line) for line in train_lines), train_lines
    assert [int(TRAIN_LINE.match(line).group(1)) for line in train_lines] == [1, 2, 3]  # type: ignore[union-attr]
    assert not any(b"\r" in line for line in lines)  # no bar redraws in a log

    records = MetricsLog(checkpoint_dir_for(run_dir) / METRICS).read()
    steps = [r["step"] for r in records]
    assert steps[:3] == [1, 2, 3] and steps == sorted(steps)
    times = [r["time"] for r in records]
    assert times == sorted(times) and len(set(times)) == len(times)
    for record in records:
        assert {"loss", "learning_rate", "grad_norm", "epoch", "tokens_per_second"} <= record.keys()
    assert not run_dir.exists()


@pytest.mark.slow
def test_bar_on_a_terminal_starts_at_the_resumed_step(tiny_config: Any, tmp_path: Path) -> None:
    """In a real pseudo-terminal (``script``): one bar, resumed at its checkpoint's step, no log lines; the
    finished run's metrics.jsonl holds every step once, across the resume."""
    from sftbridge.training.train import train

    checkpoints = tmp_path / "checkpoints"
    first = train(
        tiny_config(train__max_steps=4, train__save_steps=2, train__checkpoint_dir=str(checkpoints)),
        tmp_path / "first",
    )
    assert load_manifest(first).model_dump(mode="json")["metrics"]["global_step"] == 4
    config = tiny_config(train__max_steps=6, train__save_steps=2, train__checkpoint_dir=str(checkpoints))
    run_dir = tmp_path / "resumed"
    # A fresh pty is 0 columns wide until told otherwise; a user's terminal has a width.
    command = "stty cols 150 rows 40; " + " ".join(script_command(config, tmp_path, run_dir))
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        env=environment(),
        cwd=ROOT,
        timeout=600,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output[-3000:]
    frames = output.split("\r")
    bar = [frame for frame in frames if frame.startswith("train:")]
    assert bar[0].startswith("train:  67%") and " 4/6 " in bar[0], bar[0]
    assert any(" 6/6 [" in frame and "loss=" in frame and "tok/s=" in frame for frame in bar), bar[-3:]
    # The epoch is the bar's own, every step; the loss says which step logged it.
    assert any(re.search(r"epoch=\d\.\d\d loss=[\d.]+ .*\(step \d\)", frame) for frame in bar), bar[-3:]
    assert any(re.search(r"\| 5/6 \[\d\d:\d\d<\d\d:\d\d", frame) for frame in bar)  # elapsed<ETA
    assert "[train] " not in output

    records = MetricsLog(run_dir / METRICS).read()
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == sorted(set(train_steps))  # no step twice
    assert {r["step"] for r in records} == {1, 2, 3, 4, 5, 6}
    assert load_manifest(run_dir).model_dump(mode="json")["resumed_from"].endswith("checkpoint-4")
    assert json.loads((run_dir / METRICS).read_text().splitlines()[-1])["step"] == 6
