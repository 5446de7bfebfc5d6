"""The local backend: the training script as a subprocess on this machine, or ``torchrun`` for several."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sftbridge.config import RunConfig
from sftbridge.errors import ConfigError, RunDirError
from sftbridge.runs import default_run_dir, is_complete


class LocalJob:
    """The training process this command started; it ends with the command, so it has no page to watch."""

    console_url = None

    def __init__(self, process: subprocess.Popen[str], run_dir: Path, job_id: str) -> None:
        self.process = process
        self.run_dir = run_dir
        self.id = job_id

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        return "completed" if code == 0 else f"failed: exit code {code}"

    def summary(self) -> list[tuple[str, str]]:
        return [("job", self.id), ("state", self.status()), ("run", str(self.run_dir))]

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The process's output. A pipe is read once, to its end, so this follows whatever ``follow`` is."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            yield line.rstrip("\n")

    def wait(self) -> int:
        for line in self.logs(follow=True):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return self.process.wait()

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
            # torch.distributed.run is torchrun; --standalone needs no rendezvous server.
            launcher = [
                sys.executable,
                "-m",
                "torch.distributed.run",
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
        run_dir = Path(run_dir) if run_dir else default_run_dir("runs", config.run_name)
        job_id = f"local-{run_dir.name}"
        env = {
            **os.environ,
            "SFTBRIDGE_BACKEND": self.name,
            "SFTBRIDGE_JOB_ID": job_id,
            "SFTBRIDGE_TTY": "1" if sys.stdout.isatty() else "0",  # the child's output is piped: bar or lines
            "PYTHONUNBUFFERED": "1",
        }
        process = subprocess.Popen(
            self.command(config, config_path, overrides, run_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
        )
        return LocalJob(process, run_dir, job_id)
