"""Stop requests (signals), the hang watchdog, straggler injection, failure-safe cleanup,
and the exit codes a job script can act on.

SIGTERM, SIGUSR1 (what Slurm sends with --signal before a time limit or preemption) and
SIGINT only set a flag; every rank checks it at each step boundary with one tiny
allreduce, so all ranks agree to stop after the same step, write a checkpoint and exit
with EXIT_STOPPED, which a batch script can turn into a requeue.

Open MPI's mpiexec (4.x, ORTE) does not pass SIGINT on: for a SIGINT (Ctrl-C) or a SIGTERM
it receives, every rank gets SIGTERM, and SIGKILL odls_base_sigkill_timeout (1) s later
(measured with 4.1.4); it forwards SIGUSR1 as it is. The ranks run in their own process
groups, so a terminal's Ctrl-C reaches only mpiexec. `signal_name` says so in the log.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

from .comm import heartbeat
from .comm.heartbeat import ALIVE, PROGRESS, STATE, STEP, Heartbeat
from .comm.world import abort_job
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


def signal_name(signum: int) -> str:
    """The stop signal as the ranks received it, for the log; SIGTERM under Open MPI's
    mpiexec (ORTE sets OMPI_MCA_orte_hnp_uri) says that it may stand for a SIGINT."""
    name = signal.Signals(signum).name
    if signum == signal.SIGTERM and "OMPI_MCA_orte_hnp_uri" in os.environ:
        name += " (Open MPI's mpiexec sends SIGTERM to every rank for a SIGINT/Ctrl-C or SIGTERM it receives)"
    return name


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


PHASES = ("start-up", "loading data", "resuming", "training", "evaluation", "checkpoint", "teardown")
# for the failure tests: MPITRAIN_INJECT_FAULT="PHASE:RANK" raises on that rank when it enters PHASE;
# "exit:RANK" stops that rank (SIGSTOP) as it leaves, after its watchdog thread has ended
INJECT = os.environ.get("MPITRAIN_INJECT_FAULT", "")
_DOG: "Watchdog | None" = None


def env_timeout() -> float:
    """MPITRAIN_WATCHDOG_S (default 600): the watchdog's limit where no job file sets one
    (the command line's start-up, the Python API's default); UserError if it is not a
    number of seconds >= 0."""
    raw = os.environ.get("MPITRAIN_WATCHDOG_S", "600")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UserError(f"MPITRAIN_WATCHDOG_S={raw!r}: expected seconds >= 0 (0 = off)")
    return value


def watchdog() -> "Watchdog | None":
    """The process-wide watchdog, if one runs (cli.main starts it before anything else)."""
    return _DOG


class Watchdog:
    """Collective to create and to `close`: ends the job (exit 3) when no rank has made
    progress for `timeout` s, naming the ranks that are stopped or dead and what the others
    wait in, instead of hanging forever in a collective or an RMA wait.

    Its thread starts before anything collective, so a rank that never arrives at start-up
    is caught too. Every rank publishes its step, phase and progress in a heartbeat window
    (comm.heartbeat: steps, evaluated batches, checkpoint bytes written and data chunks read
    all count as progress); the thread bumps an `alive` slot every poll. When this rank has
    seen no progress of its own for `timeout` s it reads every rank's slots: if some rank is
    still progressing (e.g. rank 0 writing a big checkpoint) it keeps waiting; if none is,
    a rank whose `alive` slot stood still between two reads is stopped or dead (SIGSTOP,
    swapped out, killed without the launcher noticing), and the job is aborted. A rank
    killed outright is handled faster by the launcher (Open MPI ends the job).

    The thread needs the GIL, which a C call may hold while it waits (h5py's collective
    open and reads do): as a backstop, faulthandler's C-level timer dumps every thread's
    traceback and exits the process after 2 x timeout + 10 s without a poll, and the
    launcher then ends the job. The timer is armed here, by the creating thread, before the
    first poll (the job can reach such a C call within that first poll interval: a timer
    armed only by the thread would then never be armed), re-armed at every poll and by
    `set_timeout`, and cancelled when the timeout is 0.
    """

    def __init__(self, timeout: float, world=None):
        self.world, self.timeout = None, timeout
        self.step, self.state = 0, 0
        self.heart: Heartbeat | None = None
        self._stop = threading.Event()
        self._arm()  # before the thread's first poll: the main thread may hold the GIL by then
        self._thread = threading.Thread(target=self._watch, name="mpitrain-watchdog", daemon=True)
        self._thread.start()  # local until attached: the first collectives are watched too
        if world is not None:
            self.attach(world)

    def attach(self, world) -> None:
        """Collective: publish this rank's heartbeat to the others of `world`."""
        global _DOG
        self.world = world
        self.heart = Heartbeat.create(world)
        if self.heart is None and world.is_root:
            print("mpitrain: warning: one-sided MPI does not work between these ranks' nodes: the watchdog "
                  "sees only its own rank's progress (a rank waiting longer than train.watchdog_s on a slow "
                  "one ends the job)", file=sys.stderr, flush=True)
        _DOG = self

    def set_timeout(self, timeout: float) -> None:
        """Seconds without progress anywhere before the job is aborted (0 = never)."""
        self.timeout = timeout
        self._arm()
        heartbeat.tick()

    def _arm(self) -> None:
        """(Re-)arm the C-level backstop for this timeout, or cancel it (0 = off)."""
        if self.timeout > 0:
            faulthandler.dump_traceback_later(2 * self.timeout + 10, exit=True)
        else:
            faulthandler.cancel_dump_traceback_later()

    def beat(self, step: int, waiting: bool = False) -> None:
        """This rank now works on `step` (computing, or waiting on the others)."""
        self.step, self.state = step, (self.state & ~1) | int(waiting)
        if self.heart is not None:
            self.heart.set(step, self.state)

    @contextlib.contextmanager
    def waiting(self, step: int):
        """Beats around a block in which this rank waits on the others (a collective)."""
        self.beat(step, waiting=True)
        yield
        self.beat(step, waiting=True)

    def enter(self, name: str) -> None:
        """This rank is now in phase `name` (one of PHASES)."""
        self.state = 2 * PHASES.index(name)
        self.beat(self.step)
        if INJECT and self.world is not None and INJECT == f"{name}:{self.world.rank}":
            raise RuntimeError(f"injected fault in {name} on rank {self.world.rank} (MPITRAIN_INJECT_FAULT)")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Within the block this rank is in phase `name`; afterwards where it was."""
        before = self.state
        self.enter(name)
        yield
        self.state = before
        self.beat(self.step, waiting=bool(before & 1))

    def _watch(self):
        seen = None
        while not self._stop.wait(min(1.0, self.timeout / 4) if self.timeout > 0 else 1.0):
            self._arm()  # the backstop for a main thread stuck in C holding the GIL (h5py)
            if self.heart is not None:
                self.heart.alive()
            idle = time.monotonic() - heartbeat.last_progress()
            if self.timeout <= 0 or idle < self.timeout:
                seen = None
                continue
            if self.world is None:  # still creating the window: some rank never arrived
                self._abort(f"no progress for {idle:.0f} s during start-up: not every rank reached it "
                            "(a rank stopped, dead or stuck before the first collective)")
            if self.heart is None:  # no window between the nodes: only this rank is visible
                self._abort(f"no progress on this rank for {idle:.0f} s (other ranks are not visible: "
                            "one-sided MPI does not work between the nodes)")
            slots = self.heart.read_all()
            others = slots[:, PROGRESS] != (seen[:, PROGRESS] if seen is not None else slots[:, PROGRESS])
            others[self.world.rank] = False  # this rank's own ticks (including the one below) do not count
            if seen is None or others.any():
                if seen is not None:
                    heartbeat.tick()  # another rank is progressing: we are only waiting on it
                seen = slots
                continue
            self._abort(f"no progress on any rank for {idle:.0f} s; " + self._diagnose(slots, seen))

    @staticmethod
    def _diagnose(slots, seen) -> str:
        """Which ranks are stopped (alive slot frozen) and what the others are doing."""
        def doing(s):
            phase = PHASES[min(int(s[STATE]) // 2, len(PHASES) - 1)]
            return f"{'waiting in' if s[STATE] % 2 else 'computing'} step {s[STEP]} ({phase})"
        stopped = [r for r in range(len(slots)) if slots[r, ALIVE] == seen[r, ALIVE]]
        order = slots[:, STEP] * 2 + slots[:, STATE] % 2
        behind = [f"{r} ({doing(slots[r])})" for r in range(len(slots)) if order[r] < order.max()]
        parts = []
        if stopped:
            parts.append("stopped or dead: " + ", ".join(f"{r} (last {doing(slots[r])})" for r in stopped))
        parts.append(f"ranks behind: {', '.join(behind) or 'none (all at the same point)'}")
        others = [r for r in range(len(slots)) if r not in stopped]
        if others:
            parts.append("the others: " + ", ".join(f"{r} {doing(slots[r])}" for r in others[:8]))
        return "; ".join(parts)

    def _abort(self, why: str) -> None:
        who = f"rank {self.world.rank}" if self.world is not None else f"pid {os.getpid()}"
        print(f"mpitrain: watchdog on {who}: {why}; aborting (exit {EXIT_HANG})", file=sys.stderr, flush=True)
        abort_job(EXIT_HANG)

    def stop(self, leaving: bool = False) -> None:
        """Stop the thread (local; e.g. before MPI_Finalize). `leaving`: the process is about
        to exit; the C-level backstop stays armed for the last collective steps (freeing the
        heartbeat, MPI_Finalize), where a peer stopped or dead would otherwise hang this rank
        forever: after 2 x timeout + 10 s it exits with a traceback and the launcher ends the job."""
        self._stop.set()
        self._thread.join()
        if leaving:
            self._arm()
            if INJECT and self.world is not None and INJECT == f"exit:{self.world.rank}":
                os.kill(os.getpid(), signal.SIGSTOP)
        else:
            faulthandler.cancel_dump_traceback_later()

    def close(self, leaving: bool = False) -> None:
        """Collective. `leaving`: see stop."""
        global _DOG
        self.stop(leaving)
        if _DOG is self:
            _DOG = None
        if self.heart is not None:
            self.heart.free()
