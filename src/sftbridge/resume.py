"""Which interrupted run a ``train`` command continues, and whether its checkpoint fits the config.

The config a run trains with is written beside its checkpoints (``sftbridge-config.yaml``) when the run is
started. ``--resume RUN`` (and ``--run-dir RUN`` with checkpoints) refuses a checkpoint whose config differs
in anything that changes training, naming the keys; ``sftbridge train CONFIG`` alone continues the newest
interrupted run of the same config instead of starting over. Light: no torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml

from sftbridge.config import RunConfig, dump_config, flatten
from sftbridge.errors import RunDirError
from sftbridge.runs import METRICS, checkpoint_dir_for, is_complete, latest_checkpoint

RUN_CONFIG = "sftbridge-config.yaml"  # in the checkpoint folder: the config the checkpoints were trained with
# Keys that do not change what is trained: where it runs, how often it saves or logs, inference defaults.
NOT_TRAINING = (
    "run_name",
    "backend.",
    "generation.",
    "data.test_file",
    "model.hf_token_secret",
    "train.checkpoint_dir",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
)


def checkpoints_of(config: RunConfig, run_dir: Path) -> Path:
    return Path(config.train.checkpoint_dir) if config.train.checkpoint_dir else checkpoint_dir_for(run_dir)


def discard_unstarted(folder: Path) -> None:
    """After a run that failed before its first checkpoint: remove what was written for resuming it (the
    recorded config, the metrics so far), and the folder if that leaves it empty. Nothing there can be
    resumed, and a folder left behind would only mislead."""
    if latest_checkpoint(folder) is not None or not folder.is_dir():
        return
    for name in (RUN_CONFIG, METRICS):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: tracker files or a user's own are kept


def record_config(config: RunConfig, run_dir: Path) -> None:
    """Write the config beside the checkpoints, unless checkpoints trained with it are already there."""
    folder = checkpoints_of(config, run_dir)
    if latest_checkpoint(folder) is None or not (folder / RUN_CONFIG).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_CONFIG).write_text(dump_config(config), encoding="utf-8")


def training_differences(recorded: dict[str, Any], config: RunConfig) -> list[str]:
    """``key (old → new)`` for every training key that differs between a recorded config and ``config``."""
    old, new = flatten(recorded), flatten(config.to_dict())
    return [
        f"{key} ({old.get(key)!r} → {new.get(key)!r})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(NOT_TRAINING)
    ]


def check_resumable(config: RunConfig, run_dir: Path) -> Path:
    """The checkpoint ``--resume RUN`` continues from; RunDirError when there is none or it does not fit."""
    if is_complete(run_dir):
        raise RunDirError(f"{run_dir}: this run already finished; nothing to resume")
    folder = checkpoints_of(config, run_dir)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise RunDirError(f"--resume {run_dir}: no complete checkpoint in {folder}; start a new run instead")
    check_same_training(config, run_dir)
    return checkpoint


def check_same_training(config: RunConfig, run_dir: Path) -> None:
    """Refuse to continue checkpoints trained with another config (checkpoints without a record pass)."""
    file = checkpoints_of(config, run_dir) / RUN_CONFIG
    if not file.is_file() or latest_checkpoint(file.parent) is None:
        return
    differences = training_differences(yaml.safe_load(file.read_text(encoding="utf-8")) or {}, config)
    if differences:
        raise RunDirError(
            f"{run_dir}: its checkpoints were trained with another config: {'; '.join(differences)}. "
            "Resume with the same config, or start a new run (another --run-dir)"
        )


def find_interrupted(config: RunConfig, root: Path) -> Path | None:
    """The newest unfinished run under ``root`` named after ``config.run_name`` whose checkpoints were trained
    with the same config, or None."""
    if config.train.checkpoint_dir or not root.is_dir():
        return None  # a shared checkpoint folder belongs to the run given by --run-dir
    candidates = []
    for folder in root.glob(f"{config.run_name}-*.checkpoints"):
        run_dir = folder.with_name(folder.name.removesuffix(".checkpoints"))
        if is_complete(run_dir) or latest_checkpoint(folder) is None or not (folder / RUN_CONFIG).is_file():
            continue
        recorded = yaml.safe_load((folder / RUN_CONFIG).read_text(encoding="utf-8")) or {}
        if not training_differences(recorded, config):
            candidates.append(run_dir)
    return max(candidates, key=lambda path: path.name) if candidates else None
