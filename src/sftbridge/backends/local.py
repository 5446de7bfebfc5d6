"""The local backend: the training script as a subprocess on this machine, or ``torchrun`` for several.

Interrupts: the child runs in its own process group, so a terminal's Ctrl-C (sent to the whole foreground
group) and a signal sent to this process alone reach it the same way: once, forwarded by ``LocalJob.wait``.
The first SIGINT/SIGTERM lets the child finish its step and write a checkpoint (under torchrun, every worker
at the same step); a second stops it at once; a third kills it. This process always waits for the child (no
orphan), then prints one line: where the checkpoint is and the command that resumes it. Should this process
die first, Linux sends the child SIGTERM (``PR_SET_PDEATHSIG``), which checkpoints it too.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftbridge import environment
from sftbridge.config import RunConfig
from sftbridge.errors import ConfigError, RunDirError
from sftbridge.resume import (
    check_same_training,
    checkpoints_of,
    discard_unstarted,
    find_interrupted,
    record_config,
)
from sftbridge.runs import default_run_dir, is_complete, latest_checkpoint, run_lock
from sftbridge.training.fsdp import check_world_size

INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the shell's exit codes: 130, 143


class LocalJob:
    """The training process this command started; it ends with the command, so it has no page to watch."""

    console_url = None

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        run_dir: Path,
        job_id: str,
        *,
        checkpoints: Path | None = None,
        command: list[str] | None = None,
        lock: contextlib.ExitStack | None = None,
    ) -> None:
        self.process = process
        self.lock = lock  # the run folder's lock, held until the child ends (see wait)
        self.run_dir = run_dir
        self.id = job_id
        self.checkpoints = checkpoints or run_dir
        self.command = command or ["sftbridge", "train", "CONFIG"]  # how the user started it, sans run folder
        self.signals: list[int] = []

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if code < 0:
            return f"failed: killed by {signal.Signals(-code).name}"
        return "completed" if code == 0 else f"failed: exit code {code}"

    def summary(self) -> list[tuple[str, str]]:
        return [("job", self.id), ("state", self.status()), ("run", str(self.run_dir))]

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The process's output. A pipe is read once, to its end, so this follows whatever ``follow`` is."""
        for piece in self._output():
            yield piece.rstrip("\r\n")

    def _output(self) -> Iterator[str]:
        """The child's output as it wrote it: pieces ending in a newline, or in a carriage return where its
        progress bar redraws the line (a text-mode pipe would turn each redraw into a new line)."""
        assert self.process.stdout is not None
        yield from io.TextIOWrapper(self.process.stdout, encoding="utf-8", errors="replace", newline="")

    def wait(self) -> int:
        """Relay the child's output until it ends, forwarding SIGINT/SIGTERM to it; 130/143 if interrupted."""
        previous = {
            signum: signal.signal(signum, self._forward) for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for piece in self._output():
                sys.stdout.write(piece)
                sys.stdout.flush()
            code = self.process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.lock is not None:
                self.lock.close()
        if self.signals or code in INTERRUPTED or -code in (signal.SIGINT, signal.SIGTERM):
            sys.stdout.flush()
            print(self.interrupted_line(), file=sys.stderr, flush=True)
            return 128 + (self.signals[0] if self.signals else abs(code) % 128)
        if code < 0:  # killed by a signal not sent through us (kill -9, the OOM killer...): say what is left
            sys.stdout.flush()
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            print(f"the training process was killed ({name}); {self.interrupted_line()}", file=sys.stderr)
            return 128 - code
        if code != 0 and self.checkpoints != self.run_dir:
            discard_unstarted(self.checkpoints)
        return code

    def _forward(self, signum: int, _frame: Any) -> None:
        """The first signal goes to the child (torchrun passes it on to each worker once): finish the step and
        checkpoint. The second goes to the child's whole process group (the workers too): stop at once. A
        third kills the group."""
        self.signals.append(signum)
        if self.process.poll() is not None:
            return
        try:
            if len(self.signals) == 1:
                self.process.send_signal(signum)
            else:  # the child leads its own process group (process_group=0 below)
                os.killpg(self.process.pid, signum if len(self.signals) == 2 else signal.SIGKILL)
        except ProcessLookupError:  # it ended in the meantime
            pass

    def interrupted_line(self) -> str:
        checkpoint = latest_checkpoint(self.checkpoints)
        if checkpoint is None:
            again = shlex.join([*self.command, "--run-dir", str(self.run_dir)])
            return f"interrupted before the first checkpoint; nothing to resume. Start again: {again}"
        resume = shlex.join([*self.command, "--resume", str(self.run_dir)])
        return f"interrupted: checkpoint {checkpoint}; resume with: {resume}"

    def fetch(self, dest: Path | None = None) -> Path:
        if not is_complete(self.run_dir):
            raise RunDirError(f"{self.run_dir}: the run has not finished ({self.status()})")
        if dest is not None and Path(dest).resolve() != self.run_dir.resolve():
            import shutil

            shutil.copytree(self.run_dir, dest)
            return Path(dest)
        return self.run_dir


class LocalBackend:
    name = "local"
    settings_model = None
    supports_dry_run = False  # nothing to describe: the command line below is the whole job
    supports_detach = False  # the training process is a child of this command and ends with it
    supports_job_lookup = False  # for the same reason: a finished run is its folder, not a job

    def dry_run(self, config: RunConfig, *, config_path: str | None, overrides: list[str]) -> str:
        raise ConfigError("the local backend has no dry run; `sftbridge preview` shows what it trains on")

    def job(self, job_id: str, *, region: str | None = None) -> LocalJob:
        raise ConfigError(f"{job_id}: the local backend cannot look up a job; its run folder is the result")

    def command(
        self, config: RunConfig, config_path: str | None, overrides: list[str], run_dir: Path
    ) -> list[str]:
        if config.backend.num_processes > 1:
            # torchrun (training/torchrun.py: a signal ends in 130/143, not a traceback); --standalone needs
            # no rendezvous server.
            launcher = [
                sys.executable,
                "-m",
                "sftbridge.training.torchrun",
                "--standalone",
                f"--nproc_per_node={config.backend.num_processes}",
                "-m",
                "sftbridge.training.train",
            ]
        else:
            launcher = [sys.executable, "-m", "sftbridge.training.train"]
        config_args = ["--config", config_path] if config_path else []
        return [*launcher, *config_args, "--run-dir", str(run_dir), *overrides]

    def submit(
        self, config: RunConfig, *, config_path: str | None, overrides: list[str], run_dir: Path | None
    ) -> LocalJob:
        if run_dir is None and (interrupted := find_interrupted(config, Path("runs"))) is not None:
            run_dir = interrupted
            print(f"resuming the interrupted run {run_dir} (same config); --run-dir DIR starts a new one")
        run_dir = Path(run_dir) if run_dir else default_run_dir("runs", config.run_name)
        check_world_size(config, config.backend.num_processes)  # before a run folder or a process exists
        lock = contextlib.ExitStack()
        lock.enter_context(run_lock(run_dir))  # before anything is written: a second trainer writes nothing
        try:
            check_same_training(config, run_dir)
            record_config(config, run_dir)
        except BaseException:
            lock.close()
            raise
        job_id = f"local-{run_dir.name}"
        env = {
            **os.environ,
            environment.BACKEND: self.name,
            environment.JOB_ID: job_id,
            environment.TTY: "1" if sys.stdout.isatty() else "0",  # the child's output is piped: bar or lines
            environment.SUPERVISED: "1",  # this process reports interrupts; the training script is quiet
            "PYTHONUNBUFFERED": "1",
        }
        process = _start(
            lock,
            self.command(config, config_path, overrides, run_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # read as bytes, relayed as written (see LocalJob._output)
            env=env,
            process_group=0,  # a terminal's Ctrl-C reaches the child only through LocalJob.wait: once
            preexec_fn=_die_with_parent,
        )
        return LocalJob(
            process,
            run_dir,
            job_id,
            checkpoints=checkpoints_of(config, run_dir),
            command=["sftbridge", "train", config_path or "CONFIG", *overrides],
            lock=lock,
        )


def _start(lock: contextlib.ExitStack, command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start the training process; the run folder's lock is let go if it cannot start."""
    try:
        return subprocess.Popen(command, **popen)
    except BaseException:
        lock.close()
        raise


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM (checkpoint, stop) when the ``sftbridge`` process dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
