"""SageMaker charts what the training script prints: the metric regexes parse the real script's output, and
the CreateTrainingJob request carries them, the MLflow server and the hyperparameters people look for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import ROOT
from sftbridge.backends.sagemaker import hyperparameters as hp
from sftbridge.backends.sagemaker.spec import METRIC_DEFINITIONS, make_job_spec
from sftbridge.config import dump_config
from sftbridge.errors import ConfigError
from sftbridge.runs import METRICS, MetricsLog
from sftbridge.training.progress import Progress
from test_sagemaker_backend import ROLE, SEED_JOB, Recorder, aws, submit  # noqa: F401 (fixtures)

MLFLOW_ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/team-server"
REGEX = {m["Name"]: re.compile(m["Regex"]) for m in METRIC_DEFINITIONS}


def charted(output: str) -> dict[str, list[float]]:
    """What SageMaker would chart: every regex searched in every line, its group as a number."""
    values: dict[str, list[float]] = {name: [] for name in REGEX}
    for line in output.splitlines():
        for name, regex in REGEX.items():
            if match := regex.search(line):
                values[name].append(float(match.group(1)))
    return values


def test_each_regex_reads_only_its_own_field(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(None, tty=False)
    state = SimpleNamespace(global_step=0, max_steps=50, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    state.global_step = 10
    logs = {"loss": 2.5, "grad_norm": 0.75, "learning_rate": 1e-4, "num_tokens": 1e9, "epoch": 0.25}
    progress.on_log(None, state, None, logs=logs)
    answers = {
        "answer_exact_match": 0.5,
        "answer_contains": 0.75,
        "answer_mean_tokens": 4.0,
        "answer_eos_rate": 1,
    }
    base = {f"base_{key}": 0.0 for key in answers}
    progress.on_log(None, state, None, logs={**answers, **base, "epoch": 0.25})
    evaluation = {"eval_loss": 1.5, "eval_runtime": 3.0, **{f"eval_{k}": 0.0 for k in answers}}
    progress.on_log(None, state, None, logs={**evaluation, "epoch": 0.25})
    progress.on_log(None, state, None, logs={"train_loss": 9.0, "train_runtime": 30.0, "epoch": 1.0})
    values = charted(capsys.readouterr().out)
    assert values["train:loss"] == [2.5]  # neither eval_loss nor the summary's train_loss
    assert values["train:learning_rate"] == [1e-4]
    assert values["train:grad_norm"] == [0.75]
    assert values["train:epoch"] == [0.25]
    assert values["eval:loss"] == [1.5]
    # neither the base model's figures nor their repetition in the evaluation's metrics
    assert values["answer:exact_match"] == [0.5]
    assert values["answer:contains"] == [0.75]
    assert values["answer:mean_tokens"] == [4.0]
    assert values["answer:eos_rate"] == [1.0]
    assert len(values["train:tokens_per_second"]) == 1 and values["train:tokens_per_second"][0] > 0
    assert values["train:rewards_margin"] == values["train:rewards_accuracy"] == []  # SFT has none


def test_dpo_rewards_are_charted(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(None, tty=False)
    state = SimpleNamespace(global_step=0, max_steps=50, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    state.global_step = 10
    logs = {"loss": 0.4, "learning_rate": 5e-4, "num_tokens": 1e6, "epoch": 0.5, "logps/chosen": -3.0}
    rewards = {
        "rewards/chosen": 1.5,
        "rewards/rejected": -2.0,
        "rewards/margins": 3.5,
        "rewards/accuracies": 0.75,
    }
    progress.on_log(None, state, None, logs={**logs, **rewards, "logits/chosen": 0.1})
    progress.on_log(None, state, None, logs={"eval_loss": 0.5, "eval_rewards/margins": 9.0, "epoch": 0.5})
    out = capsys.readouterr().out
    assert "reward_chosen=1.5 reward_rejected=-2 margin=3.5 reward_acc=0.75" in out
    assert "logps/chosen=-3" in out and "logits/" not in out  # the log-probabilities, not the raw logits
    values = charted(out)
    assert values["train:rewards_margin"] == [3.5] and values["train:rewards_accuracy"] == [0.75]
    assert values["train:loss"] == [0.4] and values["eval:loss"] == [0.5]


@pytest.mark.slow
def test_the_real_scripts_output_is_charted(tiny_config: Any, tmp_path: Path) -> None:
    """scripts/train.py run as SageMaker runs it (output piped): every metric is charted, and the values
    equal what metrics.jsonl recorded."""
    config = tiny_config(
        data__validation_split_ratio=0.25,
        train__eval_strategy="steps",
        train__eval_steps=2,
        train__max_steps=4,
        train__answer_metrics=True,  # charted too (tiny_config leaves them off)
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "--config",
            str(path),
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    values = charted(result.stdout + result.stderr)
    records = MetricsLog(run_dir / METRICS).read()
    train = [r for r in records if "loss" in r]
    assert values["train:loss"] == pytest.approx([r["loss"] for r in train], rel=1e-3)
    assert values["train:learning_rate"] == pytest.approx([r["learning_rate"] for r in train], rel=1e-3)
    assert values["train:grad_norm"] == pytest.approx([r["grad_norm"] for r in train], rel=1e-3)
    assert values["train:tokens_per_second"] == pytest.approx([r["tokens_per_second"] for r in train], abs=1)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) >= 2 and values["eval:loss"] == pytest.approx(evals, rel=1e-3)
    answers = [r for r in records if "answer_exact_match" in r]
    assert answers, "the answer metrics were measured"
    for name in ("exact_match", "contains", "mean_tokens", "eos_rate"):
        expected = [r[f"answer_{name}"] for r in answers]
        assert values[f"answer:{name}"] == pytest.approx(expected, rel=1e-3, abs=1e-4), name


# -- the job request --------------------------------------------------------------------------------------


def job_spec(*overrides: str) -> Any:
    from sftbridge.config import load_config

    config = load_config(SEED_JOB, [f"backend.role={ROLE}", *overrides])
    return make_job_spec(config, config_path=str(SEED_JOB), region="us-east-1", image="image:latest")


def test_hyperparameters_show_the_usual_settings_even_at_their_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    spec = job_spec()
    defaults = spec.config  # the seed job leaves lora.r/alpha and the batch size at JumpStart's defaults
    assert defaults.lora.r == 8 and defaults.lora.alpha == 32
    shown = {key: spec.hyperparameters[key] for key in hp.ALWAYS_SHOWN}
    assert shown == {
        "train.epochs": hp.encode(defaults.train.epochs),
        "train.learning_rate": hp.encode(defaults.train.learning_rate),
        "train.per_device_batch_size": str(defaults.train.per_device_batch_size),
        "lora.r": "8",
        "lora.alpha": "32",
        "data.max_length": str(defaults.data.max_length),
    }


def test_mlflow_arn_reaches_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    spec = job_spec("train.report_to=[mlflow]", f"train.mlflow_tracking_uri={MLFLOW_ARN}")
    assert spec.environment["MLFLOW_TRACKING_URI"] == MLFLOW_ARN
    assert spec.environment["MLFLOW_EXPERIMENT_NAME"] == "sftbridge"
    assert spec.extras == ["mlflow"]
    assert spec.hyperparameters["train.mlflow_tracking_uri"] == MLFLOW_ARN
    with pytest.raises(ConfigError, match="not a SageMaker MLflow tracking server ARN"):
        job_spec("train.report_to=[mlflow]", "train.mlflow_tracking_uri=arn:aws:s3:::bucket")


def test_wandb_without_a_key_in_the_job_is_pointed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (note,) = [n for n in job_spec("train.report_to=[wandb]").notes if "WANDB" in n]
    assert "backend.secret_environment.WANDB_API_KEY" in note and "WANDB_MODE=offline" in note
    # From Secrets Manager: only the secret's name travels (a hyperparameter the script reads), no value.
    keyed = job_spec("train.report_to=[wandb]", "backend.secret_environment.WANDB_API_KEY=team/wandb")
    assert not any("WANDB" in n for n in keyed.notes)
    assert keyed.hyperparameters["backend.secret_environment.WANDB_API_KEY"] == "team/wandb"
    assert "WANDB_API_KEY" not in keyed.environment
    offline = job_spec("train.report_to=[wandb]", "backend.environment.WANDB_MODE=offline")
    assert offline.environment["WANDB_MODE"] == "offline"
    assert not any("WANDB" in note for note in offline.notes)
    assert offline.extras == ["wandb"]


@pytest.mark.slow  # ~35 s: the SDK's submit against moto
@pytest.mark.usefixtures("aws")
def test_create_training_job_carries_metrics_mlflow_and_hyperparameters() -> None:
    recorder = Recorder()
    submit(recorder, "train.report_to=[mlflow]", f"train.mlflow_tracking_uri={MLFLOW_ARN}")
    sent = recorder.only("CreateTrainingJob")
    assert sent["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert {m["Name"] for m in METRIC_DEFINITIONS} >= {
        "train:loss",
        "eval:loss",
        "train:learning_rate",
        "train:tokens_per_second",
    }
    assert sent["Environment"]["MLFLOW_TRACKING_URI"] == MLFLOW_ARN
    for key in hp.ALWAYS_SHOWN:
        assert key in sent["HyperParameters"], key
