"""``torchrun`` as the local backend starts it: torch's own launcher, quiet and ending a signal in a status.

On SIGINT/SIGTERM torchrun passes the signal to every worker (each finishes its step and checkpoints, the
ranks agreeing on the step: ``trainer.StopOnSignal``), waits for them, then raises ``SignalException`` out of
``main``: a traceback on the user's terminal after a clean checkpoint. Here it ends as the shell's
128 + signal instead, like the single-process script. The launcher's own warnings ("Received SIGINT death
signal...", "Setting OMP_NUM_THREADS...") show only with ``-v``, like every library's. All else is
``torch.distributed.run.main`` unchanged.
"""

from __future__ import annotations

import logging
import sys

from sftbridge.output import configure_output, verbose_from_env


def main(argv: list[str] | None = None) -> int:
    verbose = verbose_from_env()
    configure_output(verbose)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    if not verbose:  # torch's elastic loggers set their own level (LOGLEVEL, else WARNING) when created
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.ERROR)
    try:
        torchrun(argv if argv is not None else sys.argv[1:])
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
