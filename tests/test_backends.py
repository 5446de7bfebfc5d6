"""The backend layer and the SageMaker container contract the training script reads."""

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from conftest import write_jsonl
from sftbridge.backends import Backend, available_backends, get_backend
from sftbridge.backends.local import LocalBackend
from sftbridge.config import load_config
from sftbridge.errors import ConfigError, DataError
from sftbridge.training.train import SageMakerEnv, parse_args, resolve_config


def test_local_backend_is_registered() -> None:
    assert "local" in available_backends()
    assert isinstance(get_backend("local"), Backend)


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'; available: .*local"):
        get_backend("nope")


class ThirdPartyJob:
    id = "tp-1"


class ThirdPartyBackend:
    name = "thirdparty"

    def submit(self, config: Any, *, config_path: Any, overrides: Any, run_dir: Any) -> Any:
        return ThirdPartyJob()


def test_third_party_backend_from_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = metadata.EntryPoint(
        name="thirdparty", value=f"{__name__}:ThirdPartyBackend", group="sftbridge.backends"
    )
    real = metadata.entry_points
    monkeypatch.setattr(
        metadata,
        "entry_points",
        lambda **kw: [entry] if kw.get("group") == "sftbridge.backends" else real(**kw),
    )
    assert "thirdparty" in available_backends()
    assert isinstance(get_backend("thirdparty"), ThirdPartyBackend)


def test_local_command_uses_torchrun_for_several_processes() -> None:
    config = load_config(None, ["data.train_file=x.jsonl", "backend.num_processes=2"])
    command = LocalBackend().command(config, "c.yaml", ["train.epochs=1"], Path("runs/x"))
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-5:] == ["--config", "c.yaml", "--run-dir", "runs/x", "train.epochs=1"]


def test_script_arguments_in_sagemaker_form() -> None:
    args, overrides = parse_args(
        [
            "--config",
            "c.yaml",
            "--train.epochs",
            "3",
            "--model.load_in_4bit",
            "True",
            "--lora.target_modules",
            "[q_proj, v_proj]",
            "--data.test_file=null",
        ]
    )
    assert args.config == "c.yaml"
    assert overrides == {
        "train": {"epochs": 3},
        "model": {"load_in_4bit": True},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"test_file": None},
    }
    with pytest.raises(ConfigError, match="missing its value"):
        parse_args(["--train.epochs"])


def test_sagemaker_environment_is_read(tmp_path: Path) -> None:
    """Channels replace the data paths, SM_MODEL_DIR is the run directory, SM_HPS supplies the settings."""
    train_channel = tmp_path / "input" / "data" / "train"
    write_jsonl(train_channel / "sciq.jsonl", [{"question": "q?", "correct_answer": "a"}])
    (train_channel / "template.json").write_text(
        json.dumps({"prompt": "{question}", "completion": "{correct_answer}"})
    )
    test_channel = tmp_path / "input" / "data" / "test"
    write_jsonl(test_channel / "test.jsonl", [{"question": "q?", "correct_answer": "a"}])
    config_file = tmp_path / "code" / "c.yaml"
    config_file.parent.mkdir()
    config_file.write_text("data:\n  train_file: data/train.jsonl\n")
    environ = {
        "SM_CHANNEL_TRAIN": str(train_channel),
        "SM_CHANNEL_TEST": str(test_channel),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "output"),
        "SM_HPS": json.dumps({"config": str(config_file), "train.epochs": 2, "model.load_in_4bit": "true"}),
    }
    config, run_dir = resolve_config([], SageMakerEnv.from_environ(environ))
    assert config.data.train_file == str(train_channel / "sciq.jsonl")
    assert config.data.test_file == str(test_channel / "test.jsonl")
    assert config.train.epochs == 2 and config.model.load_in_4bit is True
    assert run_dir == tmp_path / "model"


def test_ambiguous_channel_is_an_error(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [{"text": "x"}])
    env = SageMakerEnv(channels={"TRAIN": tmp_path})
    with pytest.raises(DataError, match=r"expected one \.jsonl file, found"):
        env.data_overrides(load_config(None, ["data.train_file=other.jsonl"]))
