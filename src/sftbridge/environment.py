"""The environment variables sftbridge's processes pass each other, and torchrun's that they read.

``sftbridge train`` (the parent) starts the training script (the child) with ``SUPERVISED``, ``BACKEND``,
``JOB_ID`` and ``TTY`` set; ``-v`` reaches every child as ``VERBOSE``. Cheap to import: os only.
"""

from __future__ import annotations

import os

SUPERVISED = "SFTBRIDGE_SUPERVISED"  # "1": the parent reports interrupts and the outcome; the child is quiet
BACKEND = "SFTBRIDGE_BACKEND"  # the backend that started the training script (the manifest's backend.name)
JOB_ID = "SFTBRIDGE_JOB_ID"  # that backend's id of the job
TTY = "SFTBRIDGE_TTY"  # "1"/"0": whether the user's terminal is a TTY (the child's output is piped)
VERBOSE = "SFTBRIDGE_VERBOSE"  # "1": show the libraries' warnings (what -v/--verbose sets)
CACHE = "SFTBRIDGE_CACHE"  # the cache folder (default ~/.cache/sftbridge): the built-in model, ...

# torchrun's, in every worker process.
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"


def is_supervised() -> bool:
    """Whether ``sftbridge train`` started this process and reports its interrupts and outcome itself."""
    return os.environ.get(SUPERVISED) == "1"


def rank() -> int:
    return int(os.environ.get(RANK, "0"))


def world_size() -> int:
    return int(os.environ.get(WORLD_SIZE, "1"))


def local_rank() -> int:
    return int(os.environ.get(LOCAL_RANK, "0"))
