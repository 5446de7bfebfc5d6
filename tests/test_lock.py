"""The locks that installs use (requirements/*.lock, `make lock`) agree with pyproject.toml's ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT

LOCKS = {  # lock -> the extras it was compiled with (the Makefile's `lock` target)
    "dev.lock": ("dev", "qlora", "sagemaker", "serve", "export"),
    "user.lock": ("qlora", "sagemaker", "serve", "export", "tensorboard", "trackio", "mlflow", "wandb"),
}


def pinned(lock: Path) -> dict[str, str]:
    versions = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{lock.name}: {line!r} is not an exact pin"
            versions[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    return versions


@pytest.mark.parametrize("lock_name", sorted(LOCKS))
def test_lock_pins_every_requirement_within_its_range(lock_name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in LOCKS[lock_name]:
        declared += project["optional-dependencies"][extra]
    versions = pinned(ROOT / "requirements" / lock_name)
    assert "torch" not in versions  # installed first, pinned, by the Makefile: the CPU or CUDA build
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in versions, f"{lock_name} lacks {name}: run `make lock`"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"{lock_name}: {name}=={versions[name]} is outside pyproject's {requirement}; run `make lock`"
        )
