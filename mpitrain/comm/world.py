"""World: the job's communicator, ranks, node-local placement, device and logging, and the
few collectives the rest of the package needs (so nothing outside comm/ touches MPI)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from ..errors import AgreedError, UserError
from . import counts
from .shards import shard_bounds


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(out)


def describe_placement(rows: list[tuple[str, int, int, int]], show: int = 8) -> str:
    """rows[rank] = (hostname, local_rank, local_size, threads) -> the line of World.placement."""
    nodes: dict[str, list[int]] = {}
    for rank, (host, *_rest) in enumerate(rows):
        nodes.setdefault(host, []).append(rank)
    parts = [f"{host} ranks {_ranges(ranks)}" for host, ranks in list(nodes.items())[:show]]
    if len(nodes) > show:
        parts.append(f"... {len(nodes) - show} more")
    threads = sorted({t for *_rest, t in rows})
    line = (f"{len(nodes)} node{'s' * (len(nodes) > 1)}: {', '.join(parts)}; "
            f"{'/'.join(map(str, threads))} thread{'s' * (threads != [1])} per rank")
    odd = [host for host, ranks in nodes.items()
           if sorted(rows[r][1] for r in ranks) != list(range(len(ranks)))
           or any(rows[r][2] != len(ranks) for r in ranks)]
    if odd:
        line += (f" (warning: MPI's shared-memory groups differ from the hostnames on {', '.join(odd[:4])}: "
                 "node-local ranks and GPUs may be assigned wrongly)")
    return line


@dataclass
class World:
    """A private duplicate of COMM_WORLD plus what every module needs to know about it."""

    comm: MPI.Intracomm
    rank: int
    size: int
    local_rank: int
    local_size: int
    parent: "World | None" = None  # the whole job, when this world is a subset (e.g. the workers)
    direct_cuda: bool = False  # CUDA tensors go to MPI as device buffers (agreed; see select_device)

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

    def shard(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous block of n items."""
        return shard_bounds(n, self.size, self.rank)

    def cores_per_rank(self) -> int:
        """CPU cores this rank should use: its binding if bound, else the node's share."""
        mine = len(os.sched_getaffinity(0))
        total = os.cpu_count() or mine
        if mine < total:  # the launcher bound us: use what we were given
            return max(1, mine)
        job = self
        while job.parent is not None:  # (a sub-world's ranks share their node with the job's others)
            job = job.parent
        return max(1, total // job.local_size)

    def placement(self, threads: int) -> str:
        """Collective: one line saying where the ranks run, by node, e.g. "2 nodes: vn1 ranks
        0-1, vn2 ranks 2-3; 1 thread per rank". Warns (in the line) where MPI's shared-memory
        grouping (local_rank/local_size) disagrees with the hostnames."""
        import socket

        rows = self.allgather((socket.gethostname(), self.local_rank, self.local_size, threads))
        return describe_placement(rows)

    def select_device(self, want: str):
        """Collective: the job's torch device, the same kind on every rank — cuda:(local
        rank % GPUs on the node), made this thread's current device, or cpu ("auto": CUDA
        only if every rank has a GPU). Also agrees on `direct_cuda`: device buffers go to
        MPI only if every rank's library is CUDA-aware (buffers.cuda_aware), else every
        transfer is staged through pinned host memory. Decided once, before any probe."""
        import torch

        from . import buffers

        missing = [r for r, ok in enumerate(self.allgather(torch.cuda.is_available())) if not ok]
        if want == "cpu" or (want == "auto" and missing):
            self.direct_cuda = False
            return torch.device("cpu")
        if missing:
            raise AgreedError(f"train.device = 'cuda' but torch sees no CUDA device on rank(s) "
                              f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}")
        device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        self.direct_cuda = self.min(int(buffers.cuda_aware())) == 1
        return device

    @property
    def thread_multiple(self) -> bool:
        """Whether MPI calls may come from any thread at any time (MPI_THREAD_MULTIPLE)."""
        return MPI.Query_thread() == MPI.THREAD_MULTIPLE

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

    # -- tensors (counted in buffers.TRAFFIC) ---------------------------------------------------
    def allreduce_(self, t):
        """Collective: in-place sum over ranks of a contiguous tensor (any allowed dtype/device)."""
        from . import buffers

        return buffers.allreduce_(self.comm, t, direct=self.direct_cuda)

    def average_(self, t):
        """Collective: in-place mean over ranks of a contiguous tensor."""
        return self.allreduce_(t).div_(self.size) if self.size > 1 else t

    def allgather_tensor(self, t):
        """Collective: every rank's tensor t (same shape everywhere), as (ranks, *t.shape)."""
        from . import buffers

        return buffers.allgather(self.comm, t, direct=self.direct_cuda)

    def alltoall_tensor(self, t):
        """Collective: t (ranks, ...): row j goes to rank j; row i of the result came from rank i."""
        from . import buffers

        return buffers.alltoall(self.comm, t, direct=self.direct_cuda)

    def broadcast_module(self, model) -> None:
        """Collective: every rank gets rank 0's parameters and buffers."""
        from . import buffers

        buffers.broadcast_module(self.comm, model, direct=self.direct_cuda)

    @staticmethod
    def bytes_sent() -> int:
        """Tensor payload this process has handed to MPI so far (see buffers.Traffic)."""
        from . import buffers

        return buffers.TRAFFIC.sent

    # -- small collectives on Python values (not counted as traffic) -------------------------
    def sum(self, x):
        """Collective: element-wise sum over ranks of a number or numpy array."""
        return self._reduce(x, MPI.SUM)

    def max(self, x):
        """Collective: the largest value over ranks (element-wise for a numpy array)."""
        return self._reduce(x, MPI.MAX)

    def min(self, x):
        """Collective: the smallest value over ranks (element-wise for a numpy array)."""
        return self._reduce(x, MPI.MIN)

    def _reduce(self, x, op):
        if isinstance(x, np.ndarray):
            out = np.array(x, dtype=np.float64)
            counts.allreduce_chunks(self.comm, out.reshape(-1), MPI.DOUBLE, op)
            return out
        return self.comm.allreduce(x, op=op)

    def any(self, flag: bool) -> bool:
        """Collective: whether the flag is true on any rank."""
        return bool(self.comm.allreduce(bool(flag), op=MPI.LOR))

    def allgather(self, obj) -> list:
        """Collective: every rank's (small, picklable-free: str/number/array) value."""
        return self.comm.allgather(obj)

    def gather(self, obj) -> list | None:
        """Collective: every rank's value on rank 0 (None elsewhere)."""
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        """Collective: rank 0's value on every rank."""
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        """Collective."""
        self.comm.Barrier()

    def counter(self, start: int = 0):
        """Collective: a shared atomic int counter hosted on rank 0 (`next()` claims one;
        `free()` is collective). mpi4py's Counter uses Fetch_and_op only."""
        from mpi4py.util.sync import Counter

        from .rma import agreed_window

        return agreed_window(self.comm, lambda: Counter(start, typecode="q", comm=self.comm, root=0))

    def abort(self, code: int) -> None:
        """End the whole job now (every rank of every world) with exit code `code`."""
        abort_job(code)

    # -- agreement on errors ------------------------------------------------------------------
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
        w.parent, w.direct_cuda = self, self.direct_cuda
        return w

    def agree_job(self, fn, *args, **kwargs):
        """Collective over the whole job (parent, if any): like agree, so ranks outside this
        world (e.g. parameter servers) learn about a failure too."""
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

    def dup(self) -> "World":
        """Collective: the same ranks on a private communicator (for a library's own traffic)."""
        w = World.create(self.comm)
        w.parent, w.direct_cuda = self.parent, self.direct_cuda
        return w

    def free(self) -> None:
        """Collective: release the communicator (a World made by split or dup)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()


LAUNCH = "mpiexec -n N python -m mpi4py -m mpitrain"  # -m mpi4py: an exception on one rank aborts the job


def abort_job(code: int) -> None:
    """End the whole job now (every rank) with exit code `code`; needs no World."""
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)


def library_version() -> str:
    """The MPI library's name and version (first line)."""
    return MPI.Get_library_version().splitlines()[0].strip()


def exit_cleanly(code: int) -> None:
    """Leave without MPI_Abort's banner when every rank leaves the same way: finalize and
    exit with `code` (under `python -m mpi4py` a SystemExit would turn into an abort)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(code)


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear a running tqdm progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
