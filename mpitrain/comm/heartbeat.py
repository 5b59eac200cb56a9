"""Heartbeat: one int64 slot per rank in an RMA window, readable without the owner's help."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI


class Heartbeat:
    """Collective to create and to `free`. Each rank writes its own slot (a local store);
    any rank reads every slot with passive-target Get, so a rank that hangs or is stopped
    need not cooperate for the others to see where it is."""

    def __init__(self, world):
        self.comm = world.comm.Dup()
        self.win = MPI.Win.Allocate(8, 8, comm=self.comm)
        self._mine = np.frombuffer(self.win.tomemory(), dtype=np.int64, count=1)
        self._mine[0] = 0
        self.comm.Barrier()  # every slot is zeroed before anyone reads one

    def set(self, value: int) -> None:
        self._mine[0] = value

    def read_all(self) -> list[int]:
        out = []
        for r in range(self.comm.Get_size()):
            buf = np.zeros(1, np.int64)
            self.win.Lock(r, MPI.LOCK_SHARED)
            self.win.Get([buf, MPI.INT64_T], r)
            self.win.Unlock(r)
            out.append(int(buf[0]))
        return out

    def free(self) -> None:
        """Collective."""
        self.comm.Barrier()
        self.win.Free()
        self.comm.Free()
