"""``sftbridge report``: one self-contained HTML page of a run (curves, evaluations, answers, data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sftbridge.cli.options import add_run


def report_arguments(parser: argparse.ArgumentParser) -> None:
    add_run(parser)
    parser.add_argument("--out", type=Path, help="HTML file to write (default: RUN/report.html)")
    parser.add_argument(
        "--eval",
        type=Path,
        action="append",
        default=[],
        dest="evals",
        help="an `sftbridge eval --json` summary kept outside the run directory (repeatable); "
        "RUN/eval*.json are always included",
    )
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from sftbridge.report import write_report

    print(write_report(args.run, args.out, extra_evals=args.evals))
    return 0
