"""Config ⇄ SageMaker hyperparameters: ``--section.key value`` strings that every runner hands back intact.

A value reaches the training script through one of three paths: our own CLI (the string as sent); the
``sagemaker-training`` toolkit inside the Hugging Face image, which ``json.loads`` each value and passes
``str()`` of the result (``true`` → ``True``, ``["a"]`` → ``['a']``, ``null`` → ``""``); or the v2 SDK, which
``json.dumps`` each value first so the toolkit hands back the string as sent. The script parses every value
as YAML. Strings that YAML would read as something else (``123``, ``yes``, ``a: b``, ``-h``) are sent with an
explicit tag, ``!!str "..."``, which is not JSON (so no runner unquotes it) and which YAML reads back as the
string.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from sftbridge.config import RunConfig, flatten, load_config
from sftbridge.errors import ConfigError

# SageMaker's CreateTrainingJob limits: 100 hyperparameters, keys of <= 256 characters. The API accepts
# values up to 2500 characters; we keep them to 256 as well, the limit SageMaker documents for the console.
MAX_HYPERPARAMETERS = 100
# Sent even at their defaults: what people look for in the console's hyperparameters (JumpStart shows these).
ALWAYS_SHOWN = (
    "train.epochs",
    "train.learning_rate",
    "train.per_device_batch_size",
    "lora.r",
    "lora.alpha",
    "data.max_length",
)
MAX_CHARS = 256
STR_TAG = "!!str "


def encode(value: Any) -> str:
    """One config value as a hyperparameter string that parses back (as YAML) to the same value."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, str):
        if _plain(value):
            return value
        return STR_TAG + json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)  # lists (and dicts of options)


def _yaml_float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    mantissa, sep, exponent = text.partition("e")
    if sep and "." not in mantissa:  # YAML 1.1 reads 1e-05 as a string; 1.0e-05 is a float
        text = f"{mantissa}.0e{exponent}"
    return text


def _plain(text: str) -> bool:
    """True when the string can travel as is: YAML reads it back unchanged, argparse sees no option."""
    if not text or text != text.strip() or text.startswith("-") or "\n" in text:
        return False
    try:
        return bool(yaml.safe_load(text) == text)
    except yaml.YAMLError:
        return False


def diff(config: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The leaves of ``config`` that ``base`` does not already have."""
    flat, base_flat = flatten(config), flatten(base)
    return {k: v for k, v in flat.items() if k not in base_flat or base_flat[k] != v}


def to_hyperparameters(config: RunConfig, base: RunConfig | None = None) -> dict[str, str]:
    """The hyperparameters that turn ``base`` (default: the schema's defaults) into ``config``, plus the
    ``ALWAYS_SHOWN`` settings whatever their value."""
    reference = base.to_dict() if base is not None else _defaults(config)
    values = diff(config.to_dict(), reference)
    flat = flatten(config.to_dict())
    values.update({key: flat[key] for key in ALWAYS_SHOWN})
    hyperparameters: dict[str, str] = {}
    for key, value in sorted(values.items()):
        text = encode(value)
        try:
            back = yaml.safe_load(text)
        except yaml.YAMLError:
            back = text
        if back != value:
            raise ConfigError(f"{key}: the value {value!r} cannot be passed as a SageMaker hyperparameter")
        hyperparameters[key] = text
    return hyperparameters


def _defaults(config: RunConfig) -> dict[str, Any]:
    # data.train_file is the one required key; it always differs, so any placeholder will do.
    return RunConfig.model_validate({"data": {"train_file": ""}}).to_dict()


def problems(hyperparameters: dict[str, str], budget: int = MAX_HYPERPARAMETERS) -> list[str]:
    """What breaks SageMaker's limits (count, key and value length), one line each."""
    found = [
        f"{key}: {len(value)} characters (SageMaker allows {MAX_CHARS} per hyperparameter)"
        for key, value in hyperparameters.items()
        if len(value) > MAX_CHARS or len(key) > MAX_CHARS
    ]
    if len(hyperparameters) > budget:
        found.append(f"{len(hyperparameters)} hyperparameters (SageMaker allows {budget} here)")
    return found


def to_args(hyperparameters: dict[str, str]) -> list[str]:
    """The command line our own runner builds: ``--key value`` pairs."""
    return [item for key, value in hyperparameters.items() for item in (f"--{key}", value)]


def round_trip(hyperparameters: dict[str, str], config_file: str | None = None) -> RunConfig:
    """The config the training script builds from these hyperparameters (and the shipped config file)."""
    from sftbridge.training.train import parse_args

    _, overrides = parse_args(to_args(hyperparameters))
    return load_config(config_file, overrides)
