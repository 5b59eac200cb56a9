"""Stop requests (signals), the hang watchdog, straggler injection, failure-safe cleanup,
and the exit codes a job script can act on.

SIGTERM, SIGUSR1 (what Slurm sends with --signal before a time limit or preemption) and
SIGINT only set a flag; every rank checks it at each step boundary with one tiny
allreduce, so all ranks agree to stop after the same step, write a checkpoint and exit
with EXIT_STOPPED, which a batch script can turn into a requeue.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

from .comm.heartbeat import Heartbeat
from .errors import UserError

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again" -- stopped on request after a checkpoint
EXIT_HANG = 3  # the watchdog aborted a job that stopped making progress
EXIT_DIVERGED = 4  # a non-finite loss with train.on_nonfinite = "stop"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """Raised on every rank after the stop checkpoint is written."""

    agreed = True
    exit_code = EXIT_STOPPED

    def __init__(self, signame: str, step: int, path):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {path}; "
                         f"exit {EXIT_STOPPED} (rerun the same command to resume)")


class Diverged(UserError):
    """Training diverged: a non-finite loss (train.on_nonfinite = "stop"; nothing of that
    step was applied) or non-finite parameters at a checkpoint (not written). Either way
    the newest checkpoint on disk is the last good state."""

    exit_code = EXIT_DIVERGED

    def __init__(self, what: str, agreed: bool):
        self.agreed = agreed
        super().__init__(f"{what} (exit {EXIT_DIVERGED}); the newest checkpoint holds the last good state. "
                         "Lower optim.lr, check the data for NaN/inf, or set train.on_nonfinite = 'skip'")


class StopFlag:
    """Installs the handlers (main thread only)."""

    def __init__(self):
        self.signum = 0
        for s in SIGNALS:
            try:
                signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. embedded use): no signal handling
                pass

    def _handler(self, signum, frame):
        self.signum = signum

    def agreed(self, world) -> int:
        """Collective: the signal number any rank received (0 = none)."""
        return world.max(self.signum)


_FLAG: StopFlag | None = None


def stop_flag() -> StopFlag:
    """The process-wide flag; installed on first use (cli.main does it before anything
    slow, so a signal during start-up is not lost)."""
    global _FLAG
    if _FLAG is None:
        _FLAG = StopFlag()
    return _FLAG


@contextlib.contextmanager
def collective_cleanup():
    """An ExitStack for resources whose release is collective (windows, communicators,
    threads that take part in collectives). It is closed when the block ends normally or
    with an error every rank raised at the same point (`agreed`: AgreedError, Stopped, an
    agreed Diverged); on any other exception only this rank is unwinding, so nothing
    collective runs: the exception goes on to MPI_Abort (the launch wrapper,
    comm.world.LAUNCH), which ends every rank."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    except BaseException as e:
        if getattr(e, "agreed", False):
            stack.close()
        raise
    stack.close()


def inject_straggler(world, cfg_train, t_compute: float) -> None:
    """Straggler injection (train.slowdown_rank): that rank sleeps so its step takes
    slowdown_factor x its compute time."""
    if world.rank == cfg_train.slowdown_rank:
        time.sleep((cfg_train.slowdown_factor - 1) * (time.perf_counter() - t_compute))


class Watchdog:
    """Collective to create and to `close`: aborts the job when this rank sees no progress
    for `timeout` s.

    Every rank publishes the step it works on in a heartbeat window (`beat`). A thread
    checks the age of the local beat; past the timeout it reads every rank's slot
    (passive-target Get: the lagging rank need not cooperate), prints which ranks are
    behind and at which step, and aborts the job, instead of hanging forever in a
    collective or an RMA wait. A rank killed outright is handled faster by the launcher
    (Open MPI ends the job when a process dies).
    """

    def __init__(self, world, timeout: float):
        self.world, self.timeout = world, timeout
        self.heart = Heartbeat(world)
        self.step, self.last = -1, time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="mpitrain-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int, waiting: bool = False) -> None:
        """This rank now works on `step` (computing, or waiting on the others)."""
        self.step, self.last = step, time.monotonic()
        self.heart.set(2 * step + int(waiting))

    @contextlib.contextmanager
    def waiting(self, step: int):
        """Beats around a block in which this rank waits on the others (a collective)."""
        self.beat(step, waiting=True)
        yield
        self.beat(step, waiting=True)

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle < self.timeout:
                continue
            steps = self.heart.read_all()
            ahead = max(steps)
            behind = [f"{r} ({'waiting in' if s % 2 else 'computing'} step {s // 2})"
                      for r, s in enumerate(steps) if s < ahead]
            print(f"mpitrain: watchdog on rank {self.world.rank}: no progress for {idle:.0f} s in step "
                  f"{self.step}; ranks behind: {', '.join(behind) or 'none (all stuck at the same point)'}; "
                  f"aborting (exit {EXIT_HANG})", file=sys.stderr, flush=True)
            self.world.abort(EXIT_HANG)

    def close(self):
        """Collective."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.heart.free()
