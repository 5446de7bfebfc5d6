"""Ctrl-C and SIGTERM as a terminal (or SageMaker, or `kill`) sends them, to the real `sftbridge train`.

Whether the signal reaches the CLI process alone or its whole process group, the training child finishes its
step, writes a checkpoint, the CLI waits for it and prints one line naming the checkpoint and the command that
resumes it, then exits 130 (SIGINT) or 143 (SIGTERM): no traceback, no orphan. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SAMPLE_TRAIN
from sftbridge.runs import checkpoint_dir_for, latest_checkpoint, load_manifest

CLI = [sys.executable, "-m", "sftbridge.cli"]
LOSS_LOGGED = re.compile(r"'loss'|\bloss=")  # a training log line, as a dict or as the progress line
# Long enough to be interrupted mid-run, short enough to finish when resumed; checkpoints only on a signal.
ARGS = [
    str(ROOT / "configs" / "tiny-cpu.yaml"),
    f"data.train_file={SAMPLE_TRAIN}",
    "data.test_file=null",
    "train.max_steps=12",
    "train.save_steps=1000",
    "train.logging_steps=1",
    'train.eval_strategy="no"',
]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """``sftbridge train`` in a session of its own (as a shell starts a job), from ``tmp_path``."""
    return subprocess.Popen(
        [*CLI, "train", *ARGS, *extra],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def until_training(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    """Read the output until a loss is logged; the training child's pid and the lines read."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if LOSS_LOGGED.search(line):
            break
    kids = children(process.pid)
    assert len(kids) == 1, lines
    return kids[0], lines


def finish(process: subprocess.Popen[str], child: int) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert not alive(child), "the training process outlived the CLI"
    assert "Traceback" not in out + err, out[-3000:] + err[-3000:]
    return out, err


def interrupt_line(err: str) -> str:
    ours = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1, err[-3000:]
    return ours[0]


def resume_command(line: str) -> list[str]:
    argv = shlex.split(line.split("resume with: ", 1)[1])
    assert argv[:2] == ["sftbridge", "train"]
    return [*CLI, *argv[1:]]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sftbridge train ARGS`` run to the end without a signal: what a resumed run must equal."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    straight = subprocess.run(
        [*CLI, "train", *ARGS, "--run-dir", str(cwd / "run")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "signum"),
    [("process", signal.SIGINT), ("group", signal.SIGTERM)],
    ids=["SIGINT-to-the-cli", "SIGTERM-to-its-group"],
)
def test_a_signal_checkpoints_and_the_printed_command_resumes(
    tmp_path: Path, target: str, signum: int, uninterrupted: Path
) -> None:
    process = start(tmp_path)
    child, _ = until_training(process)
    if target == "group":
        os.killpg(os.getpgid(process.pid), signum)
    else:
        process.send_signal(signum)
    _, err = finish(process, child)
    assert process.returncode == 128 + signum, err[-3000:]
    line = interrupt_line(err)
    (folder,) = (tmp_path / "runs").glob("*.checkpoints")  # an interrupted run is only its checkpoints
    run_dir = Path("runs") / folder.name.removesuffix(".checkpoints")  # as printed: relative to the cwd
    assert not (tmp_path / run_dir).exists()
    checkpoint = latest_checkpoint(tmp_path / checkpoint_dir_for(run_dir))
    assert checkpoint is not None and f"checkpoint {checkpoint.relative_to(tmp_path)}" in line
    assert line.endswith(f"--resume {run_dir}")

    resumed = subprocess.run(resume_command(line), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    manifest = load_manifest(tmp_path / run_dir).model_dump(mode="json")
    assert manifest["resumed_from"].endswith(checkpoint.name)
    assert manifest["metrics"]["global_step"] == 12

    # The same final adapter as an uninterrupted run of the same command.
    first, second = adapter(uninterrupted), adapter(tmp_path / run_dir)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_then_the_same_command_resumes(tmp_path: Path) -> None:
    """A person at a terminal: Ctrl-C (the pty signals the foreground group), then the same command."""
    argv = [*CLI, "train", *ARGS]
    output, code = in_terminal(argv, tmp_path, keys=[b"\x03"])
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    ours = [line for line in output.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1 and "resume with: sftbridge train" in ours[0], output[-3000:]

    # The very same command, without --run-dir, finds the interrupted run of this config.
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the interrupted run" in again.stdout
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.endswith(".checkpoints")]
    assert load_manifest(run_dir).model_dump(mode="json")["resumed_from"] is not None


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_an_orphan(tmp_path: Path) -> None:
    process = start(tmp_path, "train.max_steps=100000")
    child, _ = until_training(process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = finish(process, child)
    assert time.monotonic() - started < 60
    assert process.returncode == 130, err[-3000:]
    interrupt_line(err)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["train.fsdp=true"]], ids=["ddp", "fsdp"])
def test_ctrl_c_under_torchrun_checkpoints_every_rank_at_one_step(
    tmp_path: Path, sharding: list[str]
) -> None:
    """Two DDP (or FSDP) workers (gloo, CPU) under torchrun, Ctrl-C to the whole group as a terminal sends
    it: both ranks stop at the same step and save one checkpoint, no traceback, no worker left; the printed
    command resumes to the end."""
    process = start(tmp_path, "backend.num_processes=2", *sharding)
    launcher, _ = until_training(process)
    workers = children(launcher)
    assert len(workers) == 2
    os.killpg(os.getpgid(process.pid), signal.SIGINT)
    _, err = finish(process, launcher)
    assert not any(alive(worker) for worker in workers), "a worker outlived torchrun"
    assert "death signal" not in err  # torchrun's own warnings: only with -v
    assert process.returncode == 130, err[-3000:]
    line = interrupt_line(err)
    resumed = subprocess.run(resume_command(line), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.endswith(".checkpoints")]
    manifest = load_manifest(run_dir).model_dump(mode="json")
    assert manifest["device"]["world_size"] == 2 and manifest["metrics"]["global_step"] == 12
    assert manifest["resumed_from"] is not None


def in_terminal(argv: list[str], cwd: Path, keys: list[bytes]) -> tuple[str, int]:
    """``argv`` on a pseudo-terminal; each of ``keys`` typed once a loss is logged. Output, exit code."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader whose controlling terminal is the pty
        os.chdir(cwd)
        os.execv(argv[0], argv)
    chunks: list[bytes] = []
    pending = list(keys)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not data:
                break
            chunks.append(data)
        if pending and LOSS_LOGGED.search(b"".join(chunks).decode(errors="replace")):
            os.write(fd, pending.pop(0))
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"), os.waitstatus_to_exitcode(status)


def test_resume_refuses_another_config_naming_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftbridge.cli import main
    from sftbridge.config import load_config
    from sftbridge.resume import RUN_CONFIG, record_config
    from sftbridge.runs import CHECKPOINT_COMPLETE

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "tiny-cpu-20260101-000000"
    record_config(load_config(ARGS[0], ARGS[1:]), run_dir)
    checkpoint = checkpoint_dir_for(run_dir) / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_COMPLETE).write_text("2\n")
    assert (checkpoint_dir_for(run_dir) / RUN_CONFIG).is_file()

    code = main(["train", *ARGS, "train.learning_rate=0.5", "lora.r=4", "--resume", str(run_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "lora.r (" in err, err
    assert "0.5" in err
    # Keys that do not change training (logging, checkpoint cadence, generation) are no reason to refuse.
    from sftbridge.resume import check_resumable

    same = load_config(ARGS[0], [*ARGS[1:], "train.logging_steps=5", "generation.max_new_tokens=9"])
    assert check_resumable(same, run_dir) == checkpoint


def test_the_same_command_finds_the_interrupted_run_of_its_config(tmp_path: Path) -> None:
    from sftbridge.config import load_config
    from sftbridge.resume import find_interrupted, record_config
    from sftbridge.runs import CHECKPOINT_COMPLETE

    config = load_config(ARGS[0], ARGS[1:])
    other = load_config(ARGS[0], [*ARGS[1:], "lora.r=4"])
    root = tmp_path / "runs"
    for name, recorded in (("tiny-cpu-20260101-000000", config), ("tiny-cpu-20260102-000000", other)):
        record_config(recorded, root / name)
        (checkpoint_dir_for(root / name) / "checkpoint-4").mkdir()
        (checkpoint_dir_for(root / name) / "checkpoint-4" / CHECKPOINT_COMPLETE).write_text("4\n")
    assert config.run_name == "tiny-cpu"
    assert find_interrupted(config, root) == root / "tiny-cpu-20260101-000000"
    assert find_interrupted(other, root) == root / "tiny-cpu-20260102-000000"
    assert find_interrupted(load_config(ARGS[0], [*ARGS[1:], "lora.r=2"]), root) is None
    (root / "tiny-cpu-20260101-000000").mkdir()
    (root / "tiny-cpu-20260101-000000" / "COMPLETE").write_text("")
    (root / "tiny-cpu-20260101-000000" / "sftbridge.json").write_text(json.dumps({}))
    assert find_interrupted(config, root) is None  # a finished run is not resumed


@pytest.mark.slow
def test_a_killed_training_process_still_gets_its_resume_line(tmp_path: Path) -> None:
    """kill -9 of the training child (the OOM killer, a user's kill): it cannot say anything itself, so the
    CLI says what is left and how to go on."""
    process = start(tmp_path, "train.save_steps=2", "train.max_steps=200", "--run-dir", str(tmp_path / "run"))
    child, _ = until_training(process)
    checkpoints = tmp_path / "run.checkpoints"
    deadline = time.monotonic() + 120
    while latest_checkpoint(checkpoints) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGKILL
    (line,) = [line for line in err.splitlines() if line.startswith("the training process was killed")]
    assert line.startswith("the training process was killed (SIGKILL); interrupted: checkpoint ")
    assert f"resume with: sftbridge train {ARGS[0]}" in line and f"--resume {tmp_path / 'run'}" in line
