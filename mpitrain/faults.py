"""Stop requests (signals) and the exit codes a job script can act on.

SIGTERM, SIGUSR1 (what Slurm sends with --signal before a time limit or preemption) and
SIGINT only set a flag; every rank checks it at each step boundary with one tiny
allreduce, so all ranks agree to stop after the same step, write a checkpoint and exit
with EXIT_STOPPED, which a batch script can turn into a requeue.
"""

from __future__ import annotations

import signal

from mpi4py import MPI

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again" -- stopped on request after a checkpoint
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """Raised on every rank after the stop checkpoint is written."""

    def __init__(self, signame: str, step: int, path):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {path}; "
                         f"exit {EXIT_STOPPED} (rerun the same command to resume)")


class StopFlag:
    """Installs the handlers (main thread only); restores the old ones on close."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for s in SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. embedded use): no signal handling
                pass

    def _handler(self, signum, frame):
        self.signum = signum

    def agreed(self, comm: MPI.Intracomm) -> int:
        """Collective: the signal number any rank received (0 = none)."""
        return comm.allreduce(self.signum, op=MPI.MAX)

    def close(self):
        for s, h in self._old.items():
            signal.signal(s, h)


_FLAG: StopFlag | None = None


def stop_flag() -> StopFlag:
    """The process-wide flag; installed on first use (cli.main does it before anything
    slow, so a signal during start-up is not lost)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = StopFlag()
    return _FLAG
