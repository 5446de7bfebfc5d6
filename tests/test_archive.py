"""A downloaded archive is checked whole before anything of it is used: flipped bytes anywhere in a
model.tar.gz (where tarfile alone would stop early and call it the end) refuse the whole archive."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from sftbridge.archive import safe_extract
from sftbridge.errors import RunDirError


def model_tar_gz(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(3 << 20))
    (folder / "adapter" / "tokenizer.json").write_text('{"model": "x"}' * 2000)
    (folder / "sftbridge.json").write_text("{}")
    (folder / "COMPLETE").write_text("done\n")
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return archive


def test_an_intact_archive_extracts(tmp_path: Path) -> None:
    out = safe_extract(model_tar_gz(tmp_path), tmp_path / "out")
    assert (out / "COMPLETE").is_file() and (
        out / "adapter" / "adapter_model.safetensors"
    ).stat().st_size == 3 << 20


@pytest.mark.parametrize("at", [0.5, 0.8, 0.9, 0.97])
def test_flipped_bytes_refuse_the_whole_archive(tmp_path: Path, at: float) -> None:
    archive = model_tar_gz(tmp_path)
    data = bytearray(archive.read_bytes())
    start = int(len(data) * at)
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    archive.write_bytes(bytes(data))
    with pytest.raises(RunDirError) as refused:
        safe_extract(archive, tmp_path / "out")
    assert str(refused.value).startswith(f"{archive}: damaged (") or "not a readable tar archive" in str(
        refused.value
    )
    assert not (tmp_path / "out").exists()  # nothing of it was written
