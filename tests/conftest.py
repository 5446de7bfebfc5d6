"""Shared fixtures: a session-wide cache for the built-in tiny model, Q/A files, one trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "data" / "sciq-sample" / "train.jsonl"
SAMPLE_TEST = ROOT / "data" / "sciq-sample" / "test.jsonl"
FAKE_TOKEN = "hf_testSECRETtoken1234567890abcdef"


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
            "train.device": "cpu",
            "lora.r": 8,
            "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "generation.max_new_tokens": 16,
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tiny-cpu config trained once on the sample data (~1 minute on 2 cores)."""
    from sftbridge.config import load_config
    from sftbridge.training.train import train

    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's data paths are relative to the repository root
    try:
        config = load_config(ROOT / "configs" / "tiny-cpu.yaml")
        return train(config, tmp_path_factory.mktemp("runs") / "tiny")
    finally:
        os.chdir(cwd)
