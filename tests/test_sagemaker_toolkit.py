"""The real ``sagemaker-training`` toolkit (the runner inside the Hugging Face training images) runs our
unchanged entry script from the source directory the backend ships, with the hyperparameters the backend
sends, on the tiny model. ``SAGEMAKER_BASE_DIR`` stands in for the container's ``/opt/ml``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, SAMPLE_TEST
from sftbridge.backends.sagemaker import hyperparameters as hp
from sftbridge.backends.sagemaker.source import stage_source
from sftbridge.backends.sagemaker.spec import CODE_CHANNEL, make_job_spec
from sftbridge.runs import CHECKPOINT_COMPLETE, load_manifest

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
CHANNEL = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}


def container(base: Path, config: Any) -> tuple[Path, dict[str, str]]:
    """Lay out ``base`` as SageMaker lays out /opt/ml for the job the backend would submit for ``config``;
    returns it with the job's environment."""
    spec = make_job_spec(config, config_path=None, region="us-east-1", image="unused-here")
    hyperparameters = spec.all_hyperparameters()
    # The two container paths in the request, moved under SAGEMAKER_BASE_DIR (everything else as sent).
    hyperparameters["sagemaker_submit_directory"] = str(base / "input" / "data" / CODE_CHANNEL)
    hyperparameters["train.checkpoint_dir"] = hp.encode(str(base / "checkpoints"))
    stage_source(base / "input" / "data" / CODE_CHANNEL)
    for channel in spec.channels:
        folder = base / "input" / "data" / channel.name
        folder.mkdir(parents=True)
        for path in channel.files:  # a run folder (model.adapter's) keeps its layout
            target = folder / (path.relative_to(channel.root) if channel.root else path.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    for folder in ("model", "output/data", "checkpoints", "input/config"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    config_dir = base / "input" / "config"
    host = socket.gethostname()  # the toolkit waits for its hosts to resolve: algo-1 never would here
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config_dir / "resourceconfig.json").write_text(
        json.dumps({"current_host": host, "hosts": [host], "network_interface_name": "lo"})
    )
    channels = [c.name for c in spec.channels] + [CODE_CHANNEL]
    (config_dir / "inputdataconfig.json").write_text(json.dumps(dict.fromkeys(channels, CHANNEL)))
    return base, spec.environment


def run_toolkit(base: Path, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The toolkit reads SAGEMAKER_BASE_DIR when it is imported: a fresh process per job. PIP_NO_INDEX: it
    # pip-installs requirements.txt, which must be satisfied already here (no downloads in tests).
    env = {**os.environ, **environment, "SAGEMAKER_BASE_DIR": str(base), "TRAINING_JOB_NAME": "toolkit"}
    env["PIP_NO_INDEX"] = "1"
    return subprocess.run(
        [sys.executable, "-c", "from sagemaker_training.cli.train import main; main()"],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One toolkit job of one epoch on 24 Q/A rows; its checkpoint seeds the resume test."""
    from sftbridge.config import load_config

    data = tmp_path_factory.mktemp("data")
    rows = (ROOT / "data" / "sciq-sample" / "train.jsonl").read_text().splitlines()[:24]
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    config = load_config(None, _tiny(data / "train.jsonl", epochs=1))
    base, environment = container(tmp_path_factory.mktemp("opt_ml"), config)
    return base, run_toolkit(base, environment)


def _tiny(train_file: Path, epochs: int) -> dict[str, Any]:
    return {
        "run_name": "toolkit-tiny",
        "data": {
            "train_file": str(train_file),
            "test_file": str(SAMPLE_TEST),
            "validation_split_ratio": 0.0,
            "max_length": 128,
            "system_prompt": "Answer: briefly, don't explain.",  # needs the tagged form to survive
        },
        "lora": {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {
            "epochs": epochs,
            "learning_rate": 5e-3,
            "per_device_batch_size": 8,
            "logging_steps": 1,
            "eval_strategy": "no",
            "device": "cpu",
        },
        "generation": {"max_new_tokens": 16},
        "backend": {"name": "sagemaker", "role": ROLE, "region": "us-east-1"},
    }


def step_logs(output: str) -> int:
    return sum(1 for line in output.splitlines() if line.startswith("[train] "))


@pytest.mark.slow
def test_toolkit_runs_the_unchanged_entry_script(one_epoch: tuple[Path, Any]) -> None:
    base, result = one_epoch
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (base / "output" / "success").is_file()  # the toolkit reported success to SageMaker
    # What ran is what the backend ships: the entry script byte for byte, from the copied source dir.
    assert (base / "code" / "train.py").read_bytes() == (ROOT / "scripts" / "train.py").read_bytes()
    assert "train.py --backend.name sagemaker" in result.stdout + result.stderr

    model_dir = base / "model"
    assert {p.name for p in model_dir.iterdir()} == {
        "COMPLETE",
        "adapter",
        "config.yaml",
        "metrics.jsonl",
        "report.html",
        "sftbridge.json",
    }
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    manifest = load_manifest(model_dir).model_dump(mode="json")
    # The shipped copy of the package ran (it is no git checkout), not the one this test imports.
    assert manifest["git"]["commit"] is None
    config = manifest["config"]
    assert config["data"]["system_prompt"] == "Answer: briefly, don't explain."
    assert config["data"]["train_file"] == str(base / "input" / "data" / "train" / "train.jsonl")
    assert config["train"]["checkpoint_dir"] == str(base / "checkpoints")
    assert manifest["backend"]["name"] == "sagemaker"  # from the job's environment
    assert not any(base.joinpath("model").rglob("checkpoint-*"))  # checkpoints never go into SM_MODEL_DIR
    assert step_logs(result.stdout) == 3  # 24 rows / batch 8

    evaluated = subprocess.run(
        [sys.executable, "-m", "sftbridge.cli", "eval", str(model_dir), "--limit", "4", "--no-base"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test.jsonl" in evaluated.stdout  # the run's own test channel, found from its manifest


@pytest.mark.slow
def test_toolkit_job_resumes_from_a_checkpoint(one_epoch: tuple[Path, Any], tmp_path: Path) -> None:
    """A spot restart: the same job, a checkpoint already synced into /opt/ml/checkpoints."""
    from sftbridge.config import load_config

    seeded, first = one_epoch
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = sorted((seeded / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and (checkpoints[-1] / CHECKPOINT_COMPLETE).is_file()

    train_file = seeded / "input" / "data" / "train" / "train.jsonl"
    base, environment = container(tmp_path / "opt_ml", load_config(None, _tiny(train_file, epochs=2)))
    shutil.copytree(checkpoints[-1], base / "checkpoints" / checkpoints[-1].name)
    result = run_toolkit(base, environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {base / 'checkpoints' / checkpoints[-1].name}" in result.stdout + result.stderr
    assert step_logs(result.stdout) == 3  # only the second epoch's 3 steps ran
    manifest = load_manifest(base / "model").model_dump(mode="json")
    assert manifest["metrics"]["global_step"] == 6


def test_v3_script_driver_cannot_carry_dotted_hyperparameters(tmp_path: Path) -> None:
    """Why the backend leaves SDK v3's SourceCode drivers out: they export every hyperparameter into a shell
    file as SM_HP_<KEY>, and `train.epochs` is no shell name, so the job dies before our script starts."""
    from sagemaker.train.constants import SM_DRIVERS_LOCAL_PATH

    env_file = tmp_path / "sm_training.env"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import environment; "
        "environment.set_env({'current_host': 'algo-1', 'current_instance_type': 'ml.g5.2xlarge', "
        "'hosts': ['algo-1'], 'network_interface_name': 'eth0'}, {'train': {}}, "
        "{'train.epochs': '2'}, output_file=sys.argv[2])"
    )
    drivers = str(Path(SM_DRIVERS_LOCAL_PATH) / "scripts")
    env = {**os.environ, "TRAINING_JOB_NAME": "driver"}
    subprocess.run([sys.executable, "-c", script, drivers, str(env_file)], check=True, env=env, timeout=120)
    assert "export SM_HP_TRAIN.EPOCHS=" in env_file.read_text()
    # sm_train.sh sources the file under `set -e`, as here.
    sourced = subprocess.run(
        ["bash", "-c", f"set -e; source {env_file}; echo reached"], capture_output=True, text=True
    )
    assert sourced.returncode != 0 and "reached" not in sourced.stdout
    assert "not a valid identifier" in sourced.stderr


@pytest.mark.slow
def test_toolkit_runs_dpo_after_sft_from_the_parent_channel(short_run: Path, tmp_path: Path) -> None:
    """DPO after SFT as a SageMaker job: the same entry script, train.method=dpo among the hyperparameters,
    the SFT run in the ``parent`` channel (not at the path the submitter had), and a run that names it."""
    from conftest import write_jsonl
    from sftbridge.config import load_config

    rows = [
        json.loads(line) for line in (ROOT / "data" / "sciq-sample" / "train.jsonl").read_text().splitlines()
    ]
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"question": r["question"], "chosen": r["correct_answer"], "rejected": "I do not know"}
            for r in rows[:8]
        ],
    )
    config = _tiny(pairs, epochs=1)
    config["lora"] = {}
    config["data"].pop("system_prompt")
    config["model"] = {"adapter": str(short_run)}
    config["train"].update(method="dpo", learning_rate=1e-3, answer_metrics=False)
    base, environment = container(tmp_path / "opt_ml", load_config(None, config))
    result = run_toolkit(base, environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert step_logs(result.stdout) == 1 and "margin=" in result.stdout  # 8 pairs / batch 8
    manifest = load_manifest(base / "model")
    parent = base / "input" / "data" / "parent"
    assert manifest.run_config.train.method == "dpo" and manifest.run_config.model.adapter == str(parent)
    assert manifest.parent_run is not None and manifest.parent_run.path == str(parent)
    assert manifest.parent_run.run_name == "tiny-cpu"
