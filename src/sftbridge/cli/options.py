"""Options several commands share, each defined once: a run folder, a config with its KEY=VALUE overrides,
``--device``, ``--json`` and ``--region``; several runs, each ``NAME=RUN`` or ``RUN``. Cheap to import:
argparse and pathlib only."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_HELP = "YAML config; keys: sftbridge config show"


def add_run(parser: argparse.ArgumentParser, help: str = "run directory") -> None:
    parser.add_argument("run", type=Path, help=help)


def add_config(
    parser: argparse.ArgumentParser,
    help: str = CONFIG_HELP,
    *,
    optional: bool = False,
    overrides_example: str | None = None,
) -> None:
    """CONFIG and the KEY=VALUE overrides after it (``cli.main`` also takes those that follow an option)."""
    parser.add_argument("config", nargs="?" if optional else None, help=help)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"e.g. {overrides_example}" if overrides_example else None,
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def add_json(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_region(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--region", help=help)


def add_merge_dtype(parser: argparse.ArgumentParser, help: str) -> None:
    """``--dtype`` of a merge (``merge``, and ``export`` of a run): inference/merge.py's DTYPES."""
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=help
    )


def add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a folder whose model needs its own Python code (trust_remote_code, auto_map) run it; "
        "without it such a folder is refused, since it may come from anyone",
    )


def add_runs(parser: argparse.ArgumentParser, help: str) -> None:
    """RUN [RUN ...], each optionally NAME=RUN: read them with :func:`named_runs`."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help=help)


def named_runs(specs: list[str]) -> dict[str, Path]:
    """``RUN`` or ``NAME=RUN`` -> {name: folder}, in the order given; a run is named after its folder.
    A path that exists is a path even with ``=`` in it. UserError for a repeated or blank name."""
    from sftbridge.errors import UserError

    runs: dict[str, Path] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or Path(spec).exists():
            name, path = Path(spec).resolve().name, spec
        if not name or any(c.isspace() for c in name):
            raise UserError(f"{spec}: NAME=RUN needs a name without spaces")
        if name in runs:
            raise UserError(
                f"{spec}: a second run named {name!r} (the first is {runs[name]}); name one NAME=RUN"
            )
        runs[name] = Path(path)
    return runs
