"""Where training runs. A backend submits the training script and returns a Job; every Job ends in a run
directory of the same layout, whichever backend produced it.

Built-in backends are named here; third-party ones register under the entry-point group
``sftbridge.backends`` (``[project.entry-points."sftbridge.backends"] mycloud = "pkg.module:MyBackend"``).
The two protocols below are all the CLI uses: a capability a backend may lack (a dry run, detaching, looking
a job up by id) is a flag the CLI reads before it asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module, metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sftbridge.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from sftbridge.config import RunConfig

ENTRY_POINT_GROUP = "sftbridge.backends"

# name -> "module:Class"; imported on use, so a backend's SDK is only imported when it is picked.
BUILTIN_BACKENDS = {
    "local": "sftbridge.backends.local:LocalBackend",
    "sagemaker": "sftbridge.backends.sagemaker.backend:SageMakerBackend",
}


@runtime_checkable
class Job(Protocol):
    """A submitted training run; ``id`` is what ``sftbridge status|logs|fetch JOB`` take."""

    id: str

    @property
    def console_url(self) -> str | None:
        """A page to watch the job on (a cloud console); None where there is none."""
        ...

    def status(self) -> str:
        """One of: running, completed, failed (backends may add detail after a colon)."""
        ...

    def summary(self) -> list[tuple[str, str]]:
        """What ``sftbridge status`` prints: (label, value) rows, the job's id and state first."""
        ...

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The job's log lines (without their newline); with ``follow``, new ones until the job ends."""
        ...

    def wait(self) -> int:
        """Block until the job ends, streaming its log; returns the exit status (0 = success)."""
        ...

    def fetch(self, dest: Path | None = None) -> Path:
        """The finished run directory on this machine (downloaded into ``dest`` where needed)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Where a run trains. The ``supports_*`` flags say which optional methods and CLI flags it serves;
    the CLI checks them and names the flag and the backend when one is missing."""

    name: str
    supports_dry_run: bool  # dry_run() describes the job without starting it (`train --dry-run`)
    supports_detach: bool  # a job runs on after the command that submitted it ends (`train --detach`)
    supports_job_lookup: bool  # job() finds a submitted job by its id (`status`, `logs`, `fetch`)

    @property
    def settings_model(self) -> type[BaseModel] | None:
        """A class attribute: the pydantic model of ``backend.options``, validated when the config is loaded;
        ``config.backend.options`` is then an instance of it. None: the options stay a plain dict."""
        ...

    def submit(
        self, config: RunConfig, *, config_path: str | None, overrides: list[str], run_dir: Path | None
    ) -> Job:
        """Start training ``config`` (read from ``config_path`` with ``overrides`` applied)."""
        ...

    def dry_run(self, config: RunConfig, *, config_path: str | None, overrides: list[str]) -> str:
        """The job ``submit`` would start, as text, with nothing started; needs ``supports_dry_run``."""
        ...

    def job(self, job_id: str, *, region: str | None = None) -> Job:
        """A job submitted earlier, by its id; needs ``supports_job_lookup``."""
        ...


def available_backends() -> list[str]:
    third_party = [ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return sorted(set(BUILTIN_BACKENDS) | set(third_party))


def backend_class(name: str) -> Any:
    """The class registered as ``name``; the config loader reads its ``settings_model`` from it."""
    if name in BUILTIN_BACKENDS:
        module, _, attr = BUILTIN_BACKENDS[name].partition(":")
        return getattr(import_module(module), attr)
    matches = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return matches[0].load()


def options_model(name: str) -> Any:
    """The pydantic model of ``backend.options`` for backend ``name`` (None: an untyped dict), what
    ``config.load_config(..., options_model=...)`` takes. Only a third-party backend is imported (built-in
    ones declare no settings model), so loading a config stays light."""
    if name in BUILTIN_BACKENDS:
        return None
    # A class without the attribute fails get_backend's protocol check, which lists what it lacks.
    return getattr(backend_class(name), "settings_model", None)


def get_backend(name: str) -> Backend:
    cls = backend_class(name)
    backend = cls()
    if not isinstance(backend, Backend):
        raise ConfigError(
            f"backend {name!r} ({cls.__module__}.{cls.__qualname__}) does not implement the Backend "
            f"protocol: it lacks {', '.join(_missing(backend, Backend))}"
        )
    return backend


def _missing(instance: object, protocol: type) -> list[str]:
    """The protocol's members (annotated attributes, methods, properties) that ``instance`` lacks."""
    members = set(protocol.__annotations__) | {name for name in vars(protocol) if not name.startswith("_")}
    return sorted(name for name in members if not hasattr(instance, name))
