"""The Hugging Face token from AWS Secrets Manager (moto), resolved where the script runs."""

import os
from pathlib import Path
from typing import Any

import pytest

from sftbridge.aws.secrets import export_hf_token, export_secret_environment
from sftbridge.errors import ConfigError

moto = pytest.importorskip("moto")


@pytest.fixture
def aws(fake_aws: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's fake AWS, without the session's HF_TOKEN (the secret is what sets it)."""
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.mark.parametrize("stored", ["hf_plainTOKEN123", '{"HF_TOKEN": "hf_plainTOKEN123"}'])
def test_token_is_read_from_the_secret(aws: None, stored: str) -> None:
    import boto3

    boto3.client("secretsmanager").create_secret(Name="hf/token", SecretString=stored)
    export_hf_token("hf/token")
    assert os.environ["HF_TOKEN"] == "hf_plainTOKEN123"


def test_missing_secret_names_the_fix(aws: None) -> None:
    with pytest.raises(
        ConfigError, match=r"model.hf_token_secret: cannot read secret 'nope'.*GetSecretValue"
    ):
        export_hf_token("nope")


def test_existing_token_wins_and_no_secret_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_local")
    export_hf_token("anything")  # not looked up: the environment already has a token
    export_hf_token(None)
    assert os.environ["HF_TOKEN"] == "hf_local"


# ---- backend.secret_environment: any variable (a tracker's key), from its secret --------------------------

KEY = "SFTBRIDGE_TEST_TRACKER_KEY"


@pytest.mark.parametrize("stored", ["key-123", '{"SFTBRIDGE_TEST_TRACKER_KEY": "key-123", "other": "x"}'])
def test_a_variable_is_set_from_its_secret(aws: None, stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv(KEY, "")  # unset as far as the export goes; monkeypatch removes it afterwards
    boto3.client("secretsmanager").create_secret(Name="team/tracker", SecretString=stored)
    export_secret_environment({KEY: "team/tracker"})
    assert os.environ[KEY] == "key-123"


def test_a_secret_without_the_value_or_missing_names_the_key(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    monkeypatch.setenv(KEY, "")  # unset as far as the export goes; monkeypatch removes it afterwards
    boto3.client("secretsmanager").create_secret(Name="team/json", SecretString='{"other": "x"}')
    with pytest.raises(ConfigError, match=rf"backend.secret_environment.{KEY}: .*holds no value for {KEY}"):
        export_secret_environment({KEY: "team/json"})
    with pytest.raises(ConfigError, match=rf"backend.secret_environment.{KEY}: cannot read secret 'nope'"):
        export_secret_environment({KEY: "nope"})
    assert os.environ[KEY] == ""


def test_a_variable_already_set_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY, "local")
    export_secret_environment({KEY: "never/read"})  # no AWS call: it would fail without credentials
    assert os.environ[KEY] == "local"


def test_a_bad_variable_name_fails_when_the_config_loads() -> None:
    from sftbridge.config import load_config

    with pytest.raises(ConfigError, match=r"backend.secret_environment.*'WANDB-KEY' is not an environment"):
        load_config(None, ["data.train_file=x.jsonl", 'backend.secret_environment={"WANDB-KEY": "s"}'])


@pytest.mark.slow
def test_training_sets_the_variables_before_it_trains(
    aws: None, tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training script reads the secrets where it runs (a SageMaker job reads them the same way)."""
    import boto3

    from sftbridge.training.train import train

    monkeypatch.setenv(KEY, "")  # unset as far as the export goes; monkeypatch removes it afterwards
    boto3.client("secretsmanager").create_secret(Name="team/tracker", SecretString="key-123")
    config = tiny_config(
        train__max_steps=1, train__answer_metrics=False, backend__secret_environment={KEY: "team/tracker"}
    )
    train(config, tmp_path / "run")
    assert os.environ[KEY] == "key-123"
