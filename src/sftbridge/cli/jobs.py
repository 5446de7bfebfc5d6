"""``sftbridge status|logs|fetch JOB``: follow a job a remote backend runs, and bring its run home."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sftbridge.cli.options import add_region
from sftbridge.errors import ConfigError

if TYPE_CHECKING:
    from sftbridge.backends import Job


def status_arguments(parser: argparse.ArgumentParser) -> None:
    _job_arguments(parser)
    parser.set_defaults(func=cmd_status)


def logs_arguments(parser: argparse.ArgumentParser) -> None:
    _job_arguments(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="print new lines until the job ends")
    parser.set_defaults(func=cmd_logs)


def fetch_arguments(parser: argparse.ArgumentParser) -> None:
    _job_arguments(parser)
    parser.add_argument("--run-dir", type=Path, help="where the run goes (default: runs/<job>)")
    parser.set_defaults(func=cmd_fetch)


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    """JOB, and where to look it up: what status, logs and fetch share."""
    parser.add_argument("job", help="the job's name, as `sftbridge train` printed it")
    parser.add_argument(
        "--backend", default="sagemaker", help="backend that runs the job (default: sagemaker)"
    )
    add_region(parser, "region of the job (sagemaker: default the AWS profile's)")


def _job(args: argparse.Namespace) -> Job:
    from sftbridge.backends import get_backend

    backend = get_backend(args.backend)
    if not backend.supports_job_lookup:
        raise ConfigError(
            f"sftbridge {args.command} --backend {backend.name}: "
            f"backend {backend.name!r} cannot look up a job by its id"
        )
    return backend.job(args.job, region=args.region)


def cmd_status(args: argparse.Namespace) -> int:
    job = _job(args)
    for key, value in job.summary():
        print(f"{key:<9} {value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job = _job(args)
    printed = 0
    for line in job.logs(follow=args.follow):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        printed += 1
    if not printed:  # silence and exit 0 read as "the command is broken"
        print(
            f"job {job.id}: no log lines yet (status: {job.status()}); --follow waits for them",
            file=sys.stderr,
        )
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    print(f"run directory: {_job(args).fetch(args.run_dir)}")
    return 0
