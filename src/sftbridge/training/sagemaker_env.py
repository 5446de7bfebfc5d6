"""SageMaker's training-container contract, as far as the training script uses it.

Input channels (``SM_CHANNEL_<NAME>``) replace the configured data files, ``SM_MODEL_DIR`` is where the run
directory goes and ``SM_HPS`` holds the job's hyperparameters (config overrides). Outside SageMaker none is
set and nothing changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftbridge.config import RunConfig
from sftbridge.errors import DataError

CHANNEL_SPLITS = {
    "train_file": ("TRAIN", "TRAINING"),
    "validation_file": ("VALIDATION",),
    "test_file": ("TEST",),
}
PARENT = "PARENT"  # the backend's `parent` channel: model.adapter's run folder


@dataclass
class SageMakerEnv:
    """The parts of SageMaker's training-container contract this script uses."""

    channels: dict[str, Path] = field(default_factory=dict)
    model_dir: Path | None = None
    output_data_dir: Path | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> SageMakerEnv:
        env = os.environ if environ is None else environ
        channels = {
            k.removeprefix("SM_CHANNEL_"): Path(v) for k, v in env.items() if k.startswith("SM_CHANNEL_")
        }
        return cls(
            channels=channels,
            model_dir=Path(env["SM_MODEL_DIR"]) if env.get("SM_MODEL_DIR") else None,
            output_data_dir=Path(env["SM_OUTPUT_DATA_DIR"]) if env.get("SM_OUTPUT_DATA_DIR") else None,
            hyperparameters=json.loads(env["SM_HPS"]) if env.get("SM_HPS") else {},
        )

    def data_overrides(self, config: RunConfig) -> dict[str, Any]:
        """Point data.*_file at the files inside the matching input channels, and model.adapter at the
        ``parent`` channel (the run it continues, uploaded whole)."""
        overrides: dict[str, Any] = {}
        for key, names in CHANNEL_SPLITS.items():
            channel = next((self.channels[n] for n in names if n in self.channels), None)
            if channel is not None:
                overrides[key] = str(_file_in_channel(channel, getattr(config.data, key)))
        found = {"data": overrides} if overrides else {}
        if PARENT in self.channels:
            found["model"] = {"adapter": str(self.channels[PARENT])}
        return found


def _file_in_channel(channel: Path, configured: str | None) -> Path:
    if configured and (channel / Path(configured).name).is_file():
        return channel / Path(configured).name
    candidates = sorted(
        p for p in channel.iterdir() if p.suffix in (".jsonl", ".json") and p.name != "template.json"
    )
    if len(candidates) != 1:
        found = ", ".join(p.name for p in channel.iterdir()) or "nothing"
        raise DataError(f"input channel {channel}: expected one .jsonl file, found {found}")
    return candidates[0]
