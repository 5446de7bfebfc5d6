"""Secrets the training script needs, fetched where it runs; never config values, never hyperparameters."""

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
    if not secret_id or os.environ.get("HF_TOKEN"):
        return
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise ConfigError("model.hf_token_secret needs boto3: pip install 'sftbridge[sagemaker]'") from exc
    try:
        value = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"]
    except (BotoCoreError, ClientError) as exc:
        raise ConfigError(
            f"model.hf_token_secret: cannot read secret {secret_id!r} ({exc}); check its name and that the "
            "role running the job may call secretsmanager:GetSecretValue on it"
        ) from None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    token = parsed.get("HF_TOKEN") or parsed.get("token") if isinstance(parsed, dict) else parsed
    if not isinstance(token, str) or not token.strip():
        raise ConfigError(
            f"model.hf_token_secret: secret {secret_id!r} holds no token (expected the token or "
            '{"HF_TOKEN": "..."})'
        )
    os.environ["HF_TOKEN"] = token.strip()
    log.info("HF_TOKEN read from secret %s", secret_id)
