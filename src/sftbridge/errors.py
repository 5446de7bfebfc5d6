"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""

import signal
import sys
from pathlib import Path


def print_error(message: object) -> None:
    """How every command shows a failure: one ``error: ...`` line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr)


class UserError(Exception):
    """Bad input: a config, a data file, an argument. The message says where and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """The config file or an override is invalid."""


class DataError(UserError):
    """A data file is invalid; the message names the file and line."""


class RunDirError(UserError):
    """A run directory is missing, incomplete or not ours."""


class Interrupted(Exception):
    """Training was stopped by a signal after writing a checkpoint; running the same command resumes it."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        super().__init__(f"stopped by {signal.Signals(signum).name}; last checkpoint: {checkpoint}")
