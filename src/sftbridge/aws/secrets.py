"""Secrets the training script needs, fetched where it runs; never config values, never hyperparameters.

``model.hf_token_secret`` gives ``HF_TOKEN``; ``backend.secret_environment`` any other variable (a tracker's
key: ``WANDB_API_KEY``, ...). A variable already set where the script runs wins and no secret is read.
"""

from __future__ import annotations

import json
import logging
import os

from sftbridge.errors import ConfigError

log = logging.getLogger(__name__)


def export_hf_token(secret_id: str | None) -> None:
    """Put the Hugging Face token from AWS Secrets Manager into ``HF_TOKEN`` for huggingface_hub.

    The secret's value is the token itself, or JSON with an ``HF_TOKEN`` (or ``token``) key. Nothing is done
    when no secret is configured or ``HF_TOKEN`` is already set.
    """
    if secret_id and not os.environ.get("HF_TOKEN"):
        _export("HF_TOKEN", secret_id, "model.hf_token_secret", keys=("HF_TOKEN", "token"))


def export_secret_environment(secrets: dict[str, str]) -> None:
    """Set each ``NAME`` of ``backend.secret_environment`` from its secret: the value itself, or JSON with a
    ``NAME`` key. A variable already set is left as it is."""
    for name, secret_id in secrets.items():
        if not os.environ.get(name):
            _export(name, secret_id, f"backend.secret_environment.{name}", keys=(name,))


def _export(name: str, secret_id: str, field: str, *, keys: tuple[str, ...]) -> None:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise ConfigError(f"{field} needs boto3: pip install 'sftbridge[sagemaker]'") from exc
    try:
        value = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"]
    except (BotoCoreError, ClientError) as exc:
        raise ConfigError(
            f"{field}: cannot read secret {secret_id!r} ({exc}); check its name and that the role running "
            "the job may call secretsmanager:GetSecretValue on it"
        ) from None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    found = next((parsed.get(k) for k in keys if parsed.get(k)), None) if isinstance(parsed, dict) else parsed
    if not isinstance(found, str) or not found.strip():
        raise ConfigError(
            f"{field}: secret {secret_id!r} holds no value for {name} (expected the value itself or "
            f'{{"{keys[0]}": "..."}})'
        )
    os.environ[name] = found.strip()
    log.info("%s read from secret %s", name, secret_id)
