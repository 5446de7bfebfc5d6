"""Open what ``generate`` and ``eval`` are given, as ``serve`` does: a finished run or a merged folder.

The folder is checked before torch is imported (seconds): a half-written run, a missing adapter or a truncated
weights file is refused at once, in one line naming the file, not as a traceback after the base model loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftbridge.errors import RunDirError
from sftbridge.runs import ADAPTER, load_manifest

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_model_folder(path: Path) -> dict[str, Any]:
    """The manifest of a finished run or of a ``sftbridge merge`` folder, once its weights look whole."""
    from sftbridge.inference.merge import read_merged_manifest

    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    merged = read_merged_manifest(path)
    if merged is not None:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise RunDirError(f"{path}: a merged folder without weights (no *.safetensors); merge again")
        for shard in shards:
            check_safetensors(shard)
        return merged
    manifest = load_manifest(path)  # refuses a run that did not finish
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        if not (path / ADAPTER / name).is_file():
            raise RunDirError(f"{path / ADAPTER / name}: missing; the run folder is incomplete, train again")
    check_safetensors(path / ADAPTER / ADAPTER_WEIGHTS)
    return manifest


def check_safetensors(file: Path) -> None:
    """Refuse a file whose header is not valid safetensors or whose tensors run past its end (truncated)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
        end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise RunDirError(f"{file}: corrupt safetensors file ({exc}); train or merge again") from None
    if 8 + length + end > size:
        raise RunDirError(
            f"{file}: truncated ({size} bytes, its header describes {8 + length + end}); train or merge again"
        )


def open_predictor(path: Path, *, device: str = "auto") -> tuple[Any, bool]:
    """A Predictor over a run or a merged folder, and whether it is merged (no base model to compare with)."""
    manifest = check_model_folder(path)
    from safetensors import SafetensorError

    from sftbridge.inference.merge import MERGED_KIND, load_merged
    from sftbridge.inference.predictor import Predictor

    merged = manifest.get("kind") == MERGED_KIND
    try:
        predictor = load_merged(path, device=device) if merged else Predictor.from_run(path, device=device)
    except SafetensorError as exc:  # damage the header check cannot see
        where = path if merged else path / ADAPTER / ADAPTER_WEIGHTS
        raise RunDirError(f"{where}: corrupt safetensors file ({exc}); train or merge again") from None
    return predictor, merged
