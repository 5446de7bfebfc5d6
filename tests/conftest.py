"""Shared fixtures: a session-wide cache for the built-in tiny model, Q/A files, two finished runs (a short
one for the commands that read a run, and one that has learned its answers), the CLI in process and fake AWS.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "data" / "sciq-sample" / "train.jsonl"
SAMPLE_TEST = ROOT / "data" / "sciq-sample" / "test.jsonl"
FAKE_TOKEN = "hf_testSECRETtoken1234567890abcdef"

# `make test` runs two pytest-xdist workers on two cores: each worker, and every process it starts, computes
# on one thread (torch's default of one per core would put four busy threads on two cores, ~3x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """``sftbridge ARGS`` in a subprocess, as a user runs it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "sftbridge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def run_clis(
    *commands: tuple[list[str], dict[str, str] | None], timeout: int = 600
) -> list[subprocess.CompletedProcess[str]]:
    """``sftbridge ARGV`` for each (argv, env), all at once. Most of a short command is Python importing, on
    one core, so on 2 cores two run in about the time of one."""
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "sftbridge.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for argv, env in commands
    ]
    results = []
    for process in started:
        out, err = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@dataclass
class CliResult:
    """What ``sftbridge ARGV`` printed and returned, run in this process (the fields of CompletedProcess)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> CliResult:
    """``sftbridge ARGS`` in this process: ``sftbridge.cli.main`` with stdout and stderr captured, in ``cwd``
    and (when given) with exactly ``env`` as the environment. For tests of a command's output and exit code;
    ``run_cli`` where the process is the behaviour (signals, a terminal, import-time output, the entry point).

    The CLI configures logging and the environment for its process (sftbridge.output): both are put back.
    """
    from sftbridge.cli import main
    from sftbridge.output import THIRD_PARTY

    saved_env = dict(os.environ)
    loggers = [logging.getLogger(name) for name in ("sftbridge", *THIRD_PARTY)]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    root.handlers = []  # so that the CLI's logging.basicConfig writes to the captured stderr
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_info:  # argparse: --help, --version, usage errors
                code = exit_info.code if isinstance(exit_info.code, int) else 1 if exit_info.code else 0
                if isinstance(exit_info.code, str):  # what the interpreter prints for sys.exit("message")
                    print(exit_info.code, file=sys.stderr)
    finally:
        os.chdir(previous)
        os.environ.clear()
        os.environ.update(saved_env)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        root.handlers, root.level = handlers, root_level
        logging.captureWarnings(False)
    return CliResult(list(args), code, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One model cache for the session (subprocesses inherit it) and a token that must never leak."""
    os.environ["SFTBRIDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from sftbridge.config import ModelSection
    from sftbridge.models.loading import load_tokenizer

    return load_tokenizer(ModelSection())


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture
def qa_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()[:24]]


@pytest.fixture
def tiny_config(tmp_path: Path, qa_rows: list[dict[str, str]]) -> Callable[..., Any]:
    """A fast tiny-model config on a small Q/A file; keyword overrides as dotted keys."""
    from sftbridge.config import load_config

    train_file = write_jsonl(tmp_path / "data" / "train.jsonl", qa_rows)

    def make(**overrides: Any) -> Any:
        values = {
            "data.train_file": str(train_file),
            "data.validation_split_ratio": 0.0,
            "data.max_length": 128,
            "train.epochs": 2,
            "train.learning_rate": 5e-3,
            "train.per_device_batch_size": 8,
            "train.logging_steps": 1,
            "train.eval_strategy": "no",
            "train.answer_metrics": False,  # generating answers while training: only where a test reads them
            "train.device": "cpu",
            "lora.r": 8,
            "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "generation.max_new_tokens": 16,
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])

    return make


def train_in_root(config_overrides: list[str], run_dir: Path) -> Path:
    """``train`` on configs/tiny-cpu.yaml with overrides, from the repository root (the config's data paths
    are relative to it)."""
    from sftbridge.config import load_config
    from sftbridge.training.train import train

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return train(load_config(ROOT / "configs" / "tiny-cpu.yaml", config_overrides), run_dir)
    finally:
        os.chdir(cwd)


SHORT_RUN_PAIRS = 8  # the first Q/A pairs of the sample: QUESTION in test_serve/test_deploy is the first


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run in seconds, for the tests of what reads a run (serve, deploy, merge, eval, report):
    the shipped tiny-cpu config, 30 steps on the sample's first 8 Q/A pairs. That is 30 epochs of them: it
    answers those 8 exactly and stops at EOS, and knows nothing else. No answer metrics (their tests train
    their own runs)."""
    return _short_run(tmp_path_factory.mktemp("short"), "tiny", slice(0, SHORT_RUN_PAIRS))


@pytest.fixture(scope="session")
def other_short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``short_run`` on the next 8 Q/A pairs: another adapter of the same base that knows other facts (serving
    several adapters at once)."""
    return _short_run(tmp_path_factory.mktemp("other"), "other", slice(SHORT_RUN_PAIRS, 2 * SHORT_RUN_PAIRS))


def _short_run(folder: Path, name: str, pairs: slice) -> Path:
    train_file = write_jsonl(folder / "train.jsonl", SAMPLE_TRAIN.read_text().splitlines()[pairs])
    overrides = [
        f"data.train_file={train_file}",
        "train.per_device_batch_size=8",
        "train.max_steps=30",
        "train.logging_steps=5",
        "train.answer_metrics=false",
    ]
    return train_in_root(overrides, folder / name)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tiny-cpu config trained once on the whole sample (450 steps, ~1 minute on 2 cores): the run
    that has memorised the training answers. Only for the tests of that memorisation, all marked slow; a test
    that needs a finished run uses ``short_run``."""
    return train_in_root([], tmp_path_factory.mktemp("runs") / "tiny")


AWS_REGION = "us-east-1"
SAGEMAKER_SDK_CONFIG = (
    "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
)


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake credentials and a region, no machine AWS config or profile, the SageMaker SDK's telemetry off and
    its IAM role check off (moto has no IAM role to check). Returns the variables set."""
    sdk_config = tmp_path / "sagemaker-config.yaml"
    sdk_config.write_text(SAGEMAKER_SDK_CONFIG)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": AWS_REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(sdk_config),
        "SAGEMAKER_VALIDATE_ROLE": "false",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def fake_aws(aws_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``aws_env`` with moto in this process: every boto3 call (and the SageMaker SDK's) goes to moto."""
    moto = pytest.importorskip("moto")
    with moto.mock_aws():
        yield aws_env


@pytest.fixture
def moto_server(aws_env: dict[str, str]) -> Iterator[str]:
    """``aws_env`` and moto as a server on 127.0.0.1, for subprocesses: pass its URL as AWS_ENDPOINT_URL."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
