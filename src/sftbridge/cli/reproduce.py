"""``sftbridge reproduce RUN``: train again from a run directory's manifest and compare the outcome.

The run's resolved ``config.yaml`` is trained as is; the data files must hash to the sha256 recorded in the
manifest (an edited dataset is a different experiment), and library versions that differ are warned about.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sftbridge.cli.options import add_run
from sftbridge.errors import DataError, RunDirError

if TYPE_CHECKING:
    from sftbridge.runs import RunManifest


def reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    add_run(parser, "a finished run directory")
    parser.add_argument(
        "--run-dir", type=Path, help="where the new run goes (default: runs/<run_name>-<time>)"
    )
    parser.set_defaults(func=cmd_reproduce)


def data_mismatches(manifest: RunManifest) -> list[str]:
    from sftbridge.runs import sha256_file

    problems = []
    for path, digest in manifest.data.sha256.items():
        if not Path(path).is_file():
            problems.append(f"{path}: not found (run from the folder the original run was started in)")
        elif sha256_file(Path(path)) != digest:
            problems.append(f"{path}: its sha256 differs from the run's ({digest[:12]}...): the data changed")
    return problems


def version_differences(manifest: RunManifest) -> list[str]:
    from sftbridge.runs import library_versions

    now = library_versions()
    return [
        f"{name}: {was} in the run, {now.get(name)} here"
        for name, was in manifest.versions.items()
        if name != "sftbridge" and was != now.get(name)
    ]


def cmd_reproduce(args: argparse.Namespace) -> int:
    from sftbridge.backends import get_backend, options_model
    from sftbridge.config import load_config
    from sftbridge.runs import CONFIG, load_manifest

    manifest = load_manifest(args.run)
    problems = data_mismatches(manifest)
    if problems:
        raise DataError(f"{args.run}: cannot reproduce:\n  " + "\n  ".join(problems))
    for difference in version_differences(manifest):
        print(f"warning: version differs: {difference}; results may differ", file=sys.stderr)
    config_path = str(args.run / CONFIG)
    config = load_config(config_path, options_model=options_model)
    backend = get_backend(config.backend.name)
    job = backend.submit(config, config_path=config_path, overrides=[], run_dir=args.run_dir)
    code = job.wait()
    if code != 0:
        return code
    run_dir = job.fetch()  # once: a remote job's fetch downloads into a folder that must be empty
    new = load_manifest(run_dir)
    before, after = manifest.metrics.train_loss, new.metrics.train_loss
    if before is None or after is None:
        raise RunDirError(f"{args.run} or {run_dir}: the manifest records no train_loss")
    verdict = "identical" if before == after else f"differs by {abs(after - before):.3g}"
    print(f"train_loss: original {before:.6f}, reproduced {after:.6f} ({verdict})")
    print(f"run directory: {run_dir}")
    return 0
