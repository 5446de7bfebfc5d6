"""The wheel: what `pip install sftbridge` gives a user who never cloned the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("sftbridge-*.whl"))


def test_wheel_ships_the_entry_script_and_the_sample_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        script = archive.read("sftbridge/_scripts/train.py")
    assert script == (ROOT / "scripts" / "train.py").read_bytes()  # the same file, unchanged
    assert {"sftbridge/_sample_data/train.jsonl", "sftbridge/_sample_data/test.jsonl"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_the_wheel_carries_the_version_of_the_source(wheel: Path) -> None:
    from sftbridge import __version__

    assert wheel.name.startswith(f"sftbridge-{__version__}-")  # pyproject reads sftbridge.__version__


def test_installed_wheel_stages_a_sagemaker_source_dir(wheel: Path, tmp_path: Path) -> None:
    """Without a checkout, the SageMaker backend finds the packaged entry script and stages the same tree."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    staged = tmp_path / "code"
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from pathlib import Path\n"
        "from sftbridge.backends.sagemaker.source import entry_script, stage_source\n"
        "print(entry_script())\n"
        "stage_source(Path(sys.argv[2]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(site), str(staged)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == site / "sftbridge" / "_scripts" / "train.py"
    assert (staged / "train.py").read_bytes() == (ROOT / "scripts" / "train.py").read_bytes()
    assert (staged / "sftbridge" / "_sample_data" / "train.jsonl").is_file()
    assert not (staged / "sftbridge" / "_scripts").exists()  # shipped once, as the entry script
