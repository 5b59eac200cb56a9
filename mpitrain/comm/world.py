"""World: the job's communicator, ranks, node-local placement, device and logging."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from mpi4py import MPI

from ..errors import AgreedError, UserError


@dataclass
class World:
    """A private duplicate of COMM_WORLD plus what every module needs to know about it."""

    comm: MPI.Intracomm
    rank: int
    size: int
    local_rank: int
    local_size: int
    parent: "World | None" = None  # the whole job, when this world is a subset (e.g. the workers)

    @classmethod
    def create(cls, base: MPI.Intracomm | None = None) -> "World":
        """Collective: duplicate `base` (COMM_WORLD) and learn the node-local layout."""
        comm = (base or MPI.COMM_WORLD).Dup()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        w = cls(comm, comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size())
        node.Free()
        return w

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def cores_per_rank(self) -> int:
        """CPU cores this rank should use: its binding if bound, else the node's share."""
        mine = len(os.sched_getaffinity(0))
        total = os.cpu_count() or mine
        if mine < total:  # the launcher bound us: use what we were given
            return max(1, mine)
        return max(1, total // self.local_size)

    def device(self, want: str):
        """torch device for this rank: cuda:(local_rank % ngpus) or cpu."""
        import torch

        if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise UserError("train.device = 'cuda' but torch sees no CUDA device")
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def logger(self, name: str = "mpitrain") -> logging.Logger:
        """A logger whose lines start with [rank/size]."""
        log = logging.getLogger(f"{name}.r{self.rank}")
        if not log.handlers:
            h = _TqdmHandler(sys.stderr)
            h.setFormatter(logging.Formatter(f"[{self.rank}/{self.size}] %(message)s"))
            log.addHandler(h)
            log.propagate = False
            log.setLevel(logging.INFO)
        return log

    def agree(self, fn, *args, **kwargs):
        """Collective: run fn on every rank; if it raised UserError on any rank, raise the
        lowest failing rank's message on all ranks (so none is left waiting)."""
        err = None
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            err, result = str(e), None
        errs = self.comm.allgather(err)
        failed = [r for r, e in enumerate(errs) if e is not None]
        if failed:
            r = failed[0]
            raise AgreedError(errs[r] if self.size == 1 or len(failed) == self.size else f"{errs[r]} (rank {r})")
        return result

    def on_root(self, fn, *args, **kwargs):
        """Collective: run fn on rank 0 only; its result, or its UserError (same message, as
        AgreedError), reaches every rank."""
        result, err = None, None
        if self.is_root:
            try:
                result = fn(*args, **kwargs)
            except UserError as e:
                err = str(e)
        result, err = self.comm.bcast((result, err), root=0)
        if err is not None:
            raise AgreedError(err)
        return result

    def split(self, color: int) -> "World":
        """Collective: the sub-world of the ranks with the same color (parent = self)."""
        sub = self.comm.Split(color, self.rank)
        w = World.create(sub)
        sub.Free()
        w.parent = self
        return w

    def agree_job(self, fn, *args, **kwargs):
        """Collective over the whole job (parent, if any): like agree, so ranks outside this
        world (e.g. parameter servers waiting in `serve`) learn about a failure too."""
        if self.parent is None:
            return self.agree(fn, *args, **kwargs)
        err = None
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            err, result = str(e), None
        self.parent.raise_any(err)
        return result

    def raise_any(self, err: str | None) -> None:
        """Collective: raise AgreedError on every rank if any rank passes an error."""
        errs = [e for e in self.comm.allgather(err) if e is not None]
        if errs:
            raise AgreedError(errs[0])


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear a running tqdm progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
