"""Heartbeat: a few int64 slots per rank in an RMA window, readable without the owner's help.

Slots: [step, state, progress, alive]. `state` is the caller's code for what the rank is
doing; `progress` counts `tick()`s (any sign of work: a step, an evaluated batch, a chunk of
a file written or read); `alive` is bumped by a thread that is only silent when the whole
process is stopped or dead. Writing a slot is a local store (no MPI call), so ticks are
cheap enough for inner loops.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from ..errors import AgreedError
from . import rma

STEP, STATE, PROGRESS, ALIVE = range(4)
_progress = {"count": 0, "when": time.monotonic()}
_current: "Heartbeat | None" = None


def tick() -> None:
    """This process made progress."""
    _progress["count"] += 1
    _progress["when"] = time.monotonic()
    if _current is not None:
        _current._mine[PROGRESS] = _progress["count"]


def last_progress() -> float:
    """time.monotonic() of this process's last tick."""
    return _progress["when"]


class Heartbeat:
    """Collective to create and to `free`: this rank's slots, and a read of every rank's."""

    @classmethod
    def create(cls, world) -> "Heartbeat | None":
        """Collective: the heartbeat, or None on every rank where one-sided MPI does not
        work between the ranks (the watchdog then sees only its own rank)."""
        comm = world.comm.Dup()
        try:
            return cls(comm)
        except AgreedError:
            return None

    def __init__(self, comm):
        global _current
        self.comm = comm
        self.win = rma.allocate(self.comm, 8 * 4, 8)
        self._mine = np.frombuffer(self.win.tomemory(), dtype=np.int64, count=4)
        self._mine[:] = 0
        self._mine[PROGRESS] = _progress["count"]
        self.comm.Barrier()  # every slot is initialised before anyone reads one
        _current = self

    def set(self, step: int, state: int) -> None:
        self._mine[STEP], self._mine[STATE] = step, state
        tick()

    def alive(self) -> None:
        self._mine[ALIVE] += 1

    def read_all(self) -> np.ndarray:
        """(ranks, 4) int64: every rank's slots (passive target: nobody needs to cooperate)."""
        out = np.zeros((self.comm.Get_size(), 4), np.int64)
        for r in range(len(out)):
            self.win.Lock(r, MPI.LOCK_SHARED)
            self.win.Get([out[r], MPI.INT64_T], r)
            self.win.Unlock(r)
        return out

    def free(self) -> None:
        """Collective."""
        global _current
        _current = None
        self.comm.Barrier()
        self.win.Free()
        self.comm.Free()
