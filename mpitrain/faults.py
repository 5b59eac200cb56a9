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


EXIT_HANG = 3  # the watchdog aborted a job that stopped making progress


class Watchdog:
    """Collective to create: aborts the job when this rank sees no progress for `timeout` s.

    Every rank publishes the last step it finished in a one-slot RMA window (`beat`). A
    thread checks the age of the local beat; past the timeout it reads every rank's slot
    (passive-target Get: the lagging rank need not cooperate), prints which ranks are
    behind and at which step, and calls MPI_Abort, instead of hanging forever in a
    collective or an RMA wait. A rank killed outright is handled faster by the launcher
    (Open MPI ends the job when a process dies).
    """

    def __init__(self, world, timeout: float, log=None):
        import threading
        import time

        import numpy as np

        self.world, self.timeout, self.log = world, timeout, log
        self.comm = world.comm.Dup()
        self.win = MPI.Win.Allocate(8, 8, comm=self.comm)
        self.mine = np.frombuffer(self.win.tomemory(), dtype=np.int64, count=1)
        self.mine[0] = 0
        self.comm.Barrier()
        self.step, self.last = -1, time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="mpitrain-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int, waiting: bool = False) -> None:
        """This rank now works on `step` (computing, or waiting on the others)."""
        import time

        self.step, self.last = step, time.monotonic()
        self.mine[0] = 2 * step + int(waiting)

    def _watch(self):
        import sys
        import time

        import numpy as np

        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle < self.timeout:
                continue
            steps = []
            for r in range(self.comm.Get_size()):
                buf = np.zeros(1, np.int64)
                self.win.Lock(r, MPI.LOCK_SHARED)
                self.win.Get([buf, MPI.INT64_T], r)
                self.win.Unlock(r)
                steps.append(int(buf[0]))
            ahead = max(steps)
            behind = [f"{r} ({'waiting in' if s % 2 else 'computing'} step {s // 2})"
                      for r, s in enumerate(steps) if s < ahead]
            print(f"mpitrain: watchdog on rank {self.world.rank}: no progress for {idle:.0f} s in step "
                  f"{self.step}; ranks behind: {', '.join(behind) or 'none (all stuck at the same point)'}; "
                  f"aborting (exit {EXIT_HANG})", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(EXIT_HANG)

    def close(self):
        """Collective."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.comm.Barrier()
        self.win.Free()
        self.comm.Free()
