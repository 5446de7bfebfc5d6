"""``sftbridge``: LoRA/QLoRA supervised fine-tuning of chat LLMs, locally or on SageMaker.

A command's module is imported only when that command runs (and heavy libraries only inside its function):
``sftbridge --help`` imports argparse and this table, nothing else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sftbridge import __version__

DESCRIPTION = (
    "LoRA/QLoRA supervised fine-tuning of chat LLMs, locally or on SageMaker. "
    "Config keys: sftbridge config show; a starter config: sftbridge config init."
)
VERBOSE_HELP = "log progress and show the libraries' warnings (also: SFTBRIDGE_VERBOSE=1)"
# command: (the module defining `<command>_arguments(parser)`, one-line help)
COMMANDS = {
    "train": ("sftbridge.cli.train", "fine-tune from a YAML config"),
    "preview": ("sftbridge.cli.train", "show training examples exactly as the model sees them"),
    "generate": ("sftbridge.cli.inference", "answer a question with a trained run"),
    "eval": ("sftbridge.cli.inference", "adapter vs. base model on a test file"),
    "report": ("sftbridge.cli.report", "one HTML page of a run: curves, eval, answer lengths, samples"),
    "serve": (
        "sftbridge.cli.serving",
        "local HTTP endpoint speaking SageMaker's, TGI's and OpenAI's APIs (a run or a merged folder)",
    ),
    "merge": ("sftbridge.cli.serving", "fold the adapter into the base: plain safetensors + tokenizer"),
    "export": (
        "sftbridge.cli.export",
        "a run or merged folder as one GGUF file + Ollama Modelfile (llama.cpp)",
    ),
    "deploy": ("sftbridge.cli.serving", "a SageMaker real-time endpoint (Hugging Face vLLM image, or TGI)"),
    "invoke": ("sftbridge.cli.serving", "ask a deployed endpoint a question (the run's template)"),
    "undeploy": ("sftbridge.cli.serving", "delete an endpoint, its endpoint config and its model"),
    "reproduce": ("sftbridge.cli.reproduce", "train again from a run's manifest and compare"),
    "status": ("sftbridge.cli.jobs", "state, elapsed and billable time, failure reason of a job"),
    "logs": ("sftbridge.cli.jobs", "a job's log (CloudWatch for SageMaker)"),
    "fetch": ("sftbridge.cli.jobs", "download a finished job's output into a local run directory"),
    "plan": ("sftbridge.cli.plan", "predict peak memory, tokens per step, time per epoch and cost of a run"),
    "runs": ("sftbridge.cli.runs", "list runs: model, data, epochs, loss, exact match, EOS rate, date"),
    "compare": ("sftbridge.cli.runs", "two runs side by side: config differences and metrics"),
    "config": (
        "sftbridge.cli.config",
        "config keys (show), a starter file (init), a JSON Schema (schema), JumpStart hyperparameters",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=_command_in(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
        # `train CONFIG --dry-run lora.r=8`: argparse ends a nargs="*" positional at the first option, so
        # KEY=VALUE overrides after an option come back unparsed; they are overrides all the same.
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from sftbridge.output import configure_output, verbose_from_env

    # Before any command imports a library: the CLI owns its output (see sftbridge.output).
    configure_output(getattr(args, "verbose", False) or verbose_from_env())
    from sftbridge.errors import UserError, print_error

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left is said here (BrokenPipeError), not at the interpreter's exit
        return code
    except UserError as exc:
        print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (which handles it itself): no traceback
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sftbridge runs --json | head`: the reader left; stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + 13  # SIGPIPE


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; with ``only``, every other command is listed with its help line and nothing else: no
    arguments, not even ``-h`` (never parsed with, they were most of the time of ``sftbridge --help``)."""
    parser = argparse.ArgumentParser(prog="sftbridge", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_verbose(parser, default=False)
    parser.add_argument(
        "--version",
        action="version",
        version=f"sftbridge {__version__}",
        help="print sftbridge's version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_line) in COMMANDS.items():
        if only is not None and name != only:
            commands.add_parser(name, help=help_line, add_help=False, formatter_class=HelpFormatter)
            continue
        command = commands.add_parser(
            name, help=help_line, description=help_line, formatter_class=HelpFormatter
        )
        # `sftbridge train CONFIG -v` works as well as `sftbridge -v train CONFIG`.
        add_verbose(command, default=argparse.SUPPRESS)
        getattr(importlib.import_module(module), f"{name}_arguments")(command)
    return parser


def add_verbose(parser: argparse.ArgumentParser, *, default: object) -> None:
    """``-v``; a command's own ``-v`` defaults to SUPPRESS so as not to reset one given before the command."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help=VERBOSE_HELP)


def _command_in(argv: list[str]) -> str:
    """The command argv names: its first word that is not an option (the top level has only flags)."""
    return next((word for word in argv if not word.startswith("-")), "")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own, told the terminal's width: to ask for it, argparse imports shutil (and shutil its
    compression modules), a tenth of the time of ``sftbridge --help``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=terminal_columns() - 2)  # argparse's own margin


def terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` says: ``$COLUMNS``, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):  # not a terminal, or closed
            columns = 0
    return columns or 80
