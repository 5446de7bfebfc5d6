"""The Hugging Face token from AWS Secrets Manager (moto), resolved where the script runs."""

import os
from collections.abc import Iterator

import pytest

from sftbridge.aws.secrets import export_hf_token
from sftbridge.errors import ConfigError

moto = pytest.importorskip("moto")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with moto.mock_aws():
        yield


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
