"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a config, a data file, an argument. The message says where and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """The config file or an override is invalid."""


class DataError(UserError):
    """A data file is invalid; the message names the file and line."""


class RunDirError(UserError):
    """A run directory is missing, incomplete or not ours."""
