"""Who may write to the terminal: sftbridge's own lines by default, the libraries' only with ``-v``.

The CLI and the training script call ``configure_output`` first thing, before any library is imported:
several of them log while they are imported (bitsandbytes on a CPU with AVX512-BF16) or read their verbosity
from the environment once (transformers, datasets), so levels set afterwards would come too late.
Cheap to import: logging, os and sys only.
"""

from __future__ import annotations

import logging
import os
import sys

from sftbridge.environment import VERBOSE

THIRD_PARTY = (
    "bitsandbytes",
    "transformers",
    "datasets",
    "peft",
    "trl",
    "accelerate",
    "torch",
    "huggingface_hub",
    "sagemaker",
    "botocore",
    "boto3",
    "urllib3",
    "py.warnings",  # warnings.warn(...) of any library, through logging.captureWarnings
)
# The libraries that read their own level from the environment when they are first imported.
LEVEL_ENV = {"TRANSFORMERS_VERBOSITY": "transformers", "DATASETS_VERBOSITY": "datasets"}
# Progress bars ("Loading weights ...", "Map ..."): only when a person watches a terminal.
PROGRESS_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
_written: set[str] = set()  # the variables set here (a user's own setting is never overwritten)


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE, "").strip().lower() in ("1", "true", "yes", "on")


def configure_output(verbose: bool, *, fmt: str = "%(levelname)s %(message)s", own_level: int = 0) -> None:
    """Our loggers at INFO with ``verbose`` (else ``own_level`` or WARNING); third-party ones at ERROR unless
    ``verbose`` (then WARNING). Child processes inherit the choice through ``SFTBRIDGE_VERBOSE``.

    Environment variables a user set (``TRANSFORMERS_VERBOSITY``, ``HF_HUB_DISABLE_PROGRESS_BARS``...) win.
    """
    if verbose:
        os.environ[VERBOSE] = "1"
    third_party = logging.WARNING if verbose else logging.ERROR
    for variable, library in LEVEL_ENV.items():
        _set_unless_user_set(variable, logging.getLevelName(third_party).lower())
        if library in sys.modules:  # already imported (in-process use): it read the variable too early
            logging.getLogger(library).setLevel(os.environ[variable].upper())
    if not sys.stderr.isatty():
        for variable in PROGRESS_BAR_ENV:
            _set_unless_user_set(variable, "1")
    for name in THIRD_PARTY:
        if name not in LEVEL_ENV.values():
            logging.getLogger(name).setLevel(third_party)
    logging.captureWarnings(True)
    logging.basicConfig(level=logging.WARNING, format=fmt)
    logging.getLogger("sftbridge").setLevel(logging.INFO if verbose else (own_level or logging.WARNING))


def _set_unless_user_set(variable: str, value: str) -> None:
    if variable not in os.environ or variable in _written:
        os.environ[variable] = value
        _written.add(variable)
