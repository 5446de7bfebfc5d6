"""The source directory a SageMaker job runs: ``scripts/train.py`` unchanged, the ``sftbridge`` package (laid
out as in the wheel, with its sample data) and ``requirements.txt``. Nothing in it depends on the job; the
config travels as hyperparameters (and, only when those cannot hold it, as the user's own config file).
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

import sftbridge
from sftbridge.backends.sagemaker.spec import ENTRY_SCRIPT, Channel
from sftbridge.errors import ConfigError
from sftbridge.models.builtin import sample_data_dir

PACKAGE_DIR = Path(sftbridge.__file__).resolve().parent
# The image brings a CUDA build of torch; a torch requirement here would replace it with a PyPI build.
IMAGE_PROVIDES = {"torch"}
SHIPPED_EXTRAS = {"qlora"}
# Not direct requirements, but their versions change what a run computes or how it loads: pinned as well.
PINNED_TOO = ("huggingface-hub",)


def entry_script() -> Path:
    """``scripts/train.py``: the copy inside an installed wheel, or that of the source checkout."""
    candidates = (PACKAGE_DIR / "_scripts" / ENTRY_SCRIPT, PACKAGE_DIR.parents[1] / "scripts" / ENTRY_SCRIPT)
    script = next((path for path in candidates if path.is_file()), None)
    if script is None:
        raise ConfigError(
            f"backend sagemaker ships scripts/{ENTRY_SCRIPT}, and this installation has none (looked at "
            f"{', '.join(map(str, candidates))}); reinstall sftbridge (pip install -e . in a checkout)"
        )
    return script


def requirements(pinned: bool = True, extras: tuple[str, ...] = ()) -> list[str]:
    """What the job installs: sftbridge's own requirements (with the QLoRA extra and ``extras``, e.g. the
    trackers of ``train.report_to``) less what the image provides.

    Pinned (the default): each at the exact version installed here, where the job is submitted, plus the
    libraries whose versions change training without being direct requirements (``PINNED_TOO``), so a job
    trains with the code that was tested here and not with whatever is newest on the day it starts. A
    requirement not installed here keeps its range. ``pinned=False`` ships the declared ranges.
    """
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires("sftbridge") or []
    except metadata.PackageNotFoundError:
        raise ConfigError(
            "backend sagemaker: install sftbridge (pip install -e .) to ship its requirements"
        ) from None
    lines = []
    for text in declared:
        requirement = Requirement(text)
        marker = requirement.marker
        shipped = SHIPPED_EXTRAS | set(extras)
        wanted = marker is None or any(marker.evaluate({"extra": extra}) for extra in shipped)
        if wanted and requirement.name not in IMAGE_PROVIDES:
            requirement.marker = None
            installed = _installed(requirement.name) if pinned else None
            lines.append(f"{requirement.name}=={installed}" if installed else str(requirement))
    if pinned:
        lines += [f"{name}=={version}" for name in PINNED_TOO if (version := _installed(name))]
    return sorted(set(lines))


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def stage_source(
    dest: Path, config_file: Path | None = None, *, pinned: bool = True, extras: tuple[str, ...] = ()
) -> Path:
    """Write the source directory into ``dest`` (which must not exist); returns ``dest``."""
    dest.mkdir(parents=True)
    shutil.copy2(entry_script(), dest / ENTRY_SCRIPT)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "_sample_data", "_scripts")
    shutil.copytree(PACKAGE_DIR, dest / "sftbridge", ignore=skip)
    # As in the wheel: builtin:tiny-llama builds its tokenizer from the sample data.
    shutil.copytree(sample_data_dir(), dest / "sftbridge" / "_sample_data")
    (dest / "requirements.txt").write_text("\n".join(requirements(pinned, extras)) + "\n", encoding="utf-8")
    if config_file is not None:
        (dest / "config").mkdir()
        shutil.copy2(config_file, dest / "config" / config_file.name)
    return dest


def stage_channels(dest: Path, channels: list[Channel]) -> dict[str, Path]:
    """One folder per local channel, holding links to its files (uploaded as they are, never copied)."""
    folders = {}
    for channel in channels:
        if channel.s3_uri:
            continue
        folder = dest / channel.name
        folder.mkdir(parents=True)
        for path in channel.files:
            link = folder / (path.relative_to(channel.root) if channel.root else path.name)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), link)
        folders[channel.name] = folder
    return folders
