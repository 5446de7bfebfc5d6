"""``model.adapter: RUN``: a run that starts from another run's adapter instead of a fresh one.

For more SFT on new data, or DPO after SFT (where the parent is also the reference, see ``dpo.py``). The
parent is opened through ``ModelFolder.open`` (every check a served run gets, before any weights load),
must be a run on the same base model, and is recorded in the new run's manifest as ``parent_run``. Its LoRA
shape (rank, alpha, target modules) is the one trained on, so it replaces the config's ``lora`` section.
"""

from __future__ import annotations

import logging
from typing import Any

from sftbridge.config import RunConfig
from sftbridge.errors import ConfigError, RunDirError
from sftbridge.inference.folder import ADAPTER_WEIGHTS, ModelFolder
from sftbridge.runs import ADAPTER, ParentRecord, sha256_file

log = logging.getLogger(__name__)


def open_parent(config: RunConfig) -> ModelFolder | None:
    """The checked run folder ``model.adapter`` names (None when unset); ConfigError saying what to fix."""
    path = config.model.adapter
    if not path:
        return None
    try:
        folder = ModelFolder.open(path, trust_remote_code=config.model.trust_remote_code)
    except RunDirError as exc:
        raise ConfigError(f"model.adapter: {exc}") from None
    if folder.is_merged:
        raise ConfigError(
            f"model.adapter: {path} is a merged model (no adapter to continue); point model.adapter at the "
            f"run it was merged from, or set model.name_or_path={path} to train a new adapter on it"
        )
    base = folder.base_model
    if base != config.model.name_or_path:
        raise ConfigError(
            f"model.adapter: {path} was trained on {base}, but model.name_or_path is "
            f"{config.model.name_or_path}; set model.name_or_path={base}"
        )
    return folder


def with_parent_lora(config: RunConfig, parent: ModelFolder) -> RunConfig:
    """The config as the run trains: the parent's LoRA shape in place of the ``lora`` section."""
    lora = parent.run_config.lora
    if lora != config.lora:
        log.info(
            "model.adapter: continuing %s's adapter (r=%d, alpha=%d); the lora section does not apply",
            parent.name,
            lora.r,
            lora.alpha,
        )
    return config.model_copy(update={"lora": lora})


def load_parent_adapter(model: Any, parent: ModelFolder) -> Any:
    """The base model with the parent's adapter on it, trainable, under PEFT's default adapter name."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, parent.path / ADAPTER, is_trainable=True)


def parent_record(parent: ModelFolder) -> ParentRecord:
    run = parent.run
    return ParentRecord(
        path=str(parent.path),
        run_name=run.run_name,
        adapter_sha256=sha256_file(parent.path / ADAPTER / ADAPTER_WEIGHTS),
        method=run.run_config.train.method,
    )
