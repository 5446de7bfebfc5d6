"""A third-party backend, installed as its own distribution, driven through the real CLI.

The throw-away distribution ``sftbridge-spool-backend`` registers ``spool`` under the entry-point group
``sftbridge.backends``: a "cloud" that is a folder. Its job is a detached worker process that logs a few
steps and then hands back a real finished run (a copy of the ``short_run`` fixture). It declares typed
settings, detaches and looks jobs up by id, and has no dry run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SAMPLE_TRAIN, run_cli
from sftbridge.runs import is_complete, load_manifest

BACKEND_MODULE = '''
"""sftbridge backend ``spool``: each job is a folder under ``spool/``, run by a detached worker."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sftbridge.errors import ConfigError, RunDirError, UserError


class SpoolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_run: str = Field(description="The finished run directory the worker hands back.")
    region: str = Field("moon-1", description="Only recorded: the spool has one region.")
    steps: int = Field(3, gt=0, description="Log lines the worker writes before it finishes.")
    hold: bool = Field(False, description="Wait for a `release` file in the job folder before starting.")


SPOOL = Path("spool")  # relative to the working directory, so `status JOB` finds what `train` submitted


class SpoolJob:
    def __init__(self, folder: Path, run_dir: Path | None = None) -> None:
        self.folder = folder
        self.id = folder.name
        self.run_dir = run_dir

    @property
    def console_url(self) -> str:
        return self.folder.resolve().as_uri()

    def status(self) -> str:
        return (self.folder / "state").read_text().strip()

    def summary(self) -> list[tuple[str, str]]:
        region = (self.folder / "region").read_text().strip()
        return [("job", self.id), ("state", self.status()), ("region", region)]

    def logs(self, follow: bool = False):
        seen = 0
        while True:
            done = self.status() != "running"  # read before the log, so no last line is missed
            text = (self.folder / "log").read_text()
            lines = text[: text.rfind("\\n") + 1].splitlines()  # whole lines only
            yield from lines[seen:]
            seen = len(lines)
            if done or not follow:
                return
            time.sleep(0.05)

    def wait(self) -> int:
        for line in self.logs(follow=True):
            print(line, flush=True)
        return 0 if self.status() == "completed" else 1

    def fetch(self, dest: Path | None = None) -> Path:
        if self.status() != "completed":
            raise RunDirError(f"job {self.id}: {self.status()}; only a completed job has a run to fetch")
        target = Path(dest or self.run_dir or Path("runs") / self.id)
        shutil.copytree(self.folder / "run", target)
        return target


class SpoolBackend:
    name = "spool"
    settings_model = SpoolSettings
    supports_dry_run = False
    supports_detach = True
    supports_job_lookup = True

    def submit(self, config, *, config_path, overrides, run_dir):
        settings = config.backend.options
        assert isinstance(settings, SpoolSettings), type(settings)  # validated at config load
        folder = SPOOL / f"{config.run_name}-{time.time_ns()}"
        folder.mkdir(parents=True)
        (folder / "state").write_text("running\\n")
        (folder / "region").write_text(settings.region + "\\n")
        (folder / "log").write_text("")
        hold = "hold" if settings.hold else "go"
        worker = [sys.executable, "-m", "spool_backend", str(folder), settings.source_run]
        worker += [str(settings.steps), hold]
        # Its own session, and no handle on our output: the job outlives `sftbridge train --detach`.
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.Popen(worker, start_new_session=True, **quiet)
        return SpoolJob(folder, run_dir)

    def dry_run(self, config, *, config_path, overrides):
        raise ConfigError("the spool backend has no dry run")

    def job(self, job_id, *, region=None):
        folder = SPOOL / job_id
        if not (folder / "state").is_file():
            raise UserError(f"job {job_id}: not found in {SPOOL.resolve()}")
        return SpoolJob(folder)


def work(folder: Path, source_run: str, steps: int, hold: bool) -> None:
    deadline = time.monotonic() + 120  # a test that failed before releasing it leaves no worker behind
    while hold and not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with (folder / "log").open("a") as log:
        for step in range(1, steps + 1):
            log.write(f"step {step}/{steps}\\n")
            log.flush()
            time.sleep(0.05)
        shutil.copytree(source_run, folder / "run")
        log.write("spool: run complete\\n")
    (folder / "state").write_text("completed\\n")


if __name__ == "__main__":
    work(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hold")
'''

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sftbridge-spool-backend"
version = "0.1.0"

[project.entry-points."sftbridge.backends"]
spool = "spool_backend:SpoolBackend"

[tool.hatch.build.targets.wheel]
include = ["spool_backend.py"]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distribution, built and pip-installed into a folder of its own (put on PYTHONPATH)."""
    source = tmp_path_factory.mktemp("spool-src")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "spool_backend.py").write_text(BACKEND_MODULE)
    target = tmp_path_factory.mktemp("spool-site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True)
    assert (target / "spool_backend.py").is_file()
    return target


@pytest.fixture
def env(site: Path) -> dict[str, str]:
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def sftbridge(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``sftbridge ARGS`` in a subprocess, with the spool distribution importable, working in ``cwd``."""
    return run_cli(*args, cwd=cwd, env=env, timeout=120)


def write_config(tmp_path: Path, **options: object) -> str:
    """A config whose ``backend.options`` are ``options``; ``--backend spool`` picks the backend."""
    config = tmp_path / "spool.yaml"
    config.write_text(
        f"run_name: spooled\ndata:\n  train_file: {SAMPLE_TRAIN}\nbackend:\n  options:\n"
        + "".join(f"    {key}: {value}\n" for key, value in options.items())
    )
    return str(config)


def job_id(stdout: str) -> str:
    first = stdout.splitlines()[0]
    assert first.startswith("job ") and first.endswith(" (spool)"), stdout
    return first.split()[1]


def assert_same_run(fetched: Path, original: Path) -> None:
    assert is_complete(fetched)
    assert sorted(p.relative_to(fetched) for p in fetched.rglob("*")) == sorted(
        p.relative_to(original) for p in original.rglob("*")
    )
    assert load_manifest(fetched) == load_manifest(original)


def test_detach_then_status_logs_follow_fetch(env: dict[str, str], tmp_path: Path, short_run: Path) -> None:
    config = write_config(tmp_path, source_run=short_run, region="moon-2", hold="true")

    submitted = sftbridge(env, tmp_path, "train", config, "--backend", "spool", "--detach")
    assert submitted.returncode == 0, submitted.stderr
    job = job_id(submitted.stdout)
    folder = tmp_path / "spool" / job
    assert submitted.stdout.splitlines()[1:] == [
        folder.resolve().as_uri(),  # the job's console_url
        f"follow it: sftbridge status {job} --backend spool / sftbridge logs {job} -f --backend spool / "
        f"sftbridge fetch {job} --backend spool",
    ]

    status = sftbridge(env, tmp_path, "status", job, "--backend", "spool")  # the worker holds until released
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [f"job       {job}", "state     running", "region    moon-2"]
    early = sftbridge(env, tmp_path, "fetch", job, "--backend", "spool")
    assert (
        early.returncode == 2
        and early.stderr == f"error: job {job}: running; only a completed job has a run to fetch\n"
    )

    follow = subprocess.Popen(
        [sys.executable, "-m", "sftbridge.cli", "logs", job, "--follow", "--backend", "spool"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert follow.poll() is None  # still following a running job
    (folder / "release").touch()
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    assert out.splitlines() == ["step 1/3", "step 2/3", "step 3/3", "spool: run complete"]

    status = sftbridge(env, tmp_path, "status", job, "--backend", "spool")
    assert status.stdout.splitlines()[1] == "state     completed"
    fetched = sftbridge(
        env, tmp_path, "fetch", job, "--backend", "spool", "--run-dir", str(tmp_path / "fetched")
    )
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == f"run directory: {tmp_path / 'fetched'}\n"
    assert_same_run(tmp_path / "fetched", short_run)


def test_train_in_the_foreground(env: dict[str, str], tmp_path: Path, short_run: Path) -> None:
    config = write_config(tmp_path, source_run=short_run, steps=2)
    result = sftbridge(
        env, tmp_path, "train", config, "--backend", "spool", "--run-dir", str(tmp_path / "run")
    )
    assert result.returncode == 0, result.stderr
    job = job_id(result.stdout)
    assert result.stdout.splitlines()[1:] == [
        (tmp_path / "spool" / job).resolve().as_uri(),
        "step 1/2",
        "step 2/2",
        "spool: run complete",
        f"run directory: {tmp_path / 'run'}",
    ]
    assert_same_run(tmp_path / "run", short_run)


def test_a_typo_in_its_settings_fails_at_config_load(env: dict[str, str], tmp_path: Path) -> None:
    config = write_config(tmp_path, source_run=tmp_path, regoin="mars", steps=0)
    result = sftbridge(env, tmp_path, "train", config, "--backend", "spool", "lora.r=0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {config}: 3 problem(s):",
        "  lora.r: Input should be greater than 0 (got 0)",
        "  backend.options.regoin: unknown key; did you mean 'region'? "
        "valid keys: source_run, region, steps, hold",
        "  backend.options.steps: Input should be greater than 0 (got 0)",
    ]
    assert not (tmp_path / "spool").exists()  # nothing was submitted

    config = write_config(tmp_path, region="mars")
    missing = sftbridge(env, tmp_path, "train", config, "--backend", "spool")
    assert missing.stderr.splitlines()[1:] == ["  backend.options.source_run: required, but not set"]


def test_dry_run_is_refused_by_a_backend_without_one(env: dict[str, str], tmp_path: Path) -> None:
    result = sftbridge(
        env, tmp_path, "train", write_config(tmp_path, source_run=tmp_path), "--backend", "spool", "--dry-run"
    )
    assert result.returncode == 2
    assert result.stderr == "error: --dry-run: backend 'spool' has no dry run; drop --dry-run\n"
    assert not (tmp_path / "spool").exists()


def test_unknown_job_and_listing(env: dict[str, str], tmp_path: Path) -> None:
    result = sftbridge(env, tmp_path, "logs", "nope", "--backend", "spool")
    assert result.returncode == 2
    assert result.stderr == f"error: job nope: not found in {tmp_path / 'spool'}\n"
    unknown = sftbridge(env, tmp_path, "status", "x", "--backend", "spoool")
    assert unknown.stderr == "error: unknown backend 'spoool'; available: local, sagemaker, spool\n"


def test_logs_say_when_a_job_has_none_yet(env: dict[str, str], tmp_path: Path) -> None:
    job = tmp_path / "spool" / "spool-queued"
    job.mkdir(parents=True)
    (job / "state").write_text("running\n")
    (job / "region").write_text("moon-1\n")
    (job / "log").write_text("")
    result = sftbridge(env, tmp_path, "logs", "spool-queued", "--backend", "spool")
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr == "job spool-queued: no log lines yet (status: running); --follow waits for them\n"
