"""Where training runs. A backend submits the training script and returns a Job; every Job ends in a run
directory of the same layout, whichever backend produced it.

Built-in backends are named here; third-party ones register under the entry-point group
``sftbridge.backends`` (``[project.entry-points."sftbridge.backends"] mycloud = "pkg.module:MyBackend"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module, metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

from sftbridge.config import RunConfig
from sftbridge.errors import ConfigError

ENTRY_POINT_GROUP = "sftbridge.backends"

# name -> "module:Class"; imported on use, so a backend's SDK is only imported when it is picked.
BUILTIN_BACKENDS = {
    "local": "sftbridge.backends.local:LocalBackend",
    "sagemaker": "sftbridge.backends.sagemaker.backend:SageMakerBackend",
}


@runtime_checkable
class Job(Protocol):
    id: str

    def status(self) -> str:
        """One of: running, completed, failed (backends may add detail after a colon)."""
        ...

    def logs(self) -> Iterator[str]:
        """The job's log lines as they come."""
        ...

    def wait(self) -> int:
        """Block until the job ends, streaming its log; returns the exit status (0 = success)."""
        ...

    def fetch(self, dest: Path | None = None) -> Path:
        """The finished run directory on this machine (downloaded into ``dest`` where needed)."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def submit(
        self, config: RunConfig, *, config_path: str | None, overrides: list[str], run_dir: Path | None
    ) -> Job:
        """Start training ``config`` (read from ``config_path`` with ``overrides`` applied)."""
        ...


def available_backends() -> list[str]:
    third_party = [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return sorted(set(BUILTIN_BACKENDS) | set(third_party))


def get_backend(name: str) -> Backend:
    if name in BUILTIN_BACKENDS:
        module, _, attr = BUILTIN_BACKENDS[name].partition(":")
        backend_class = getattr(import_module(module), attr)
    else:
        matches = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            raise ConfigError(
                f"backend.name: unknown backend {name!r}; available: {', '.join(available_backends())}"
            )
        backend_class = matches[0].load()
    backend = backend_class()
    if not isinstance(backend, Backend):
        raise ConfigError(f"backend {name!r} ({backend_class!r}) does not implement the Backend protocol")
    return backend
