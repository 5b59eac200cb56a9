"""One-sided MPI: a sharded vector store in RMA windows, clocks, and target progress.

A `ShardedVector` splits a flat float32 vector over `owners` (all ranks, or dedicated
server ranks). Each owner exposes, in windows made with `Win.Allocate`:

    params  float32[m]              the shard
    state   float32[state_slots*m + 1]  optimizer state of the shard (+ a step counter)
    accum   float32[slots*m]        gradient accumulators, one per clock in flight (sync)
    ctl     int64[slots + 1]        push counts per slot, then the shard's version

Locking discipline (passive target, one lock epoch per operation):
- `accumulate` into `accum` takes a SHARED lock: MPI makes concurrent accumulates with the
  same op element-wise atomic. Each pusher flushes its accumulate *before* it counts itself
  with Fetch_and_op on `ctl`, so the pusher that sees the count reach n knows every
  contribution has landed.
- Reading `params` takes a SHARED lock; changing `params`/`state` (an optimizer step by
  whichever rank applies it) holds EXCLUSIVE locks on both, so no read is ever torn.
- Counts and versions change only through Fetch_and_op / Accumulate on int64 (never
  Compare_and_swap: it crashes the target under Debian's default osc/rdma, design.md).
- Lock order is always params -> state -> accum -> ctl, so two appliers cannot deadlock.

Progress: passive-target operations must complete while the owner computes in Python or
sleeps. Open MPI's osc/rdma over shared memory needs no help from the target, but
osc/pt2pt (e.g. across nodes over TCP) only progresses inside MPI calls on the target, so
every rank runs a `ProgressThread` that calls `Iprobe` every millisecond (measured in
design.md: 15-30 ms instead of seconds with a busy target). Its cost is one cheap MPI call
per millisecond on a thread that sleeps otherwise.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from mpi4py import MPI

from ..errors import AgreedError

from . import counts
from .buffers import TRAFFIC
from .shards import shard_bounds

F32 = MPI.FLOAT
I64 = MPI.INT64_T


# float32 transfers at element `disp` of owner's window, in pieces of at most
# counts.MAX_COUNT elements (MPI counts are C ints; a shard may hold more)
def _get(win, out: np.ndarray, owner: int, disp: int = 0) -> None:
    for lo, hi in counts.chunks(len(out)):
        win.Get([out[lo:hi], F32], owner, target=(disp + lo, hi - lo, F32))


def _put(win, data: np.ndarray, owner: int, disp: int = 0) -> None:
    for lo, hi in counts.chunks(len(data)):
        win.Put([data[lo:hi], F32], owner, target=(disp + lo, hi - lo, F32))


def _accumulate(win, data: np.ndarray, owner: int, disp: int = 0) -> None:
    """Element-wise atomic SUM, as one Accumulate (pieces do not change that)."""
    for lo, hi in counts.chunks(len(data)):
        win.Accumulate([data[lo:hi], F32], owner, target=(disp + lo, hi - lo, F32), op=MPI.SUM)


class ProgressThread:
    """Calls Iprobe on a private communicator every `period` seconds until stopped."""

    def __init__(self, comm: MPI.Intracomm, period: float = 1e-3):
        self.comm = comm.Dup()
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpitrain-rma-progress", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period):
            self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.comm.Free()


def wait_until(pred, timeout: float | None = None, what: str = "condition"):
    """Poll pred() with exponential back-off (50 us .. 2 ms)."""
    delay, t0 = 5e-5, time.perf_counter()
    while not pred():
        if timeout is not None and time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 2e-3)


NO_RMA = ("one-sided MPI (RMA windows) does not work across these ranks' nodes ({error}); with Open MPI "
          "4.x over TCP osc/rdma needs an RDMA network and osc/pt2pt refuses MPI_THREAD_MULTIPLE: use "
          "sync.strategy = allreduce or a local strategy, or an MPI whose one-sided component works here "
          "(e.g. OMPI_MCA_osc=ucx where UCX has a transport)")


def _win_allocate(nbytes: int, disp_unit: int, comm):
    return MPI.Win.Allocate(nbytes, disp_unit, comm=comm)


def agreed_window(comm, make):
    """Collective: make() (a window, or an object built on one), or one AgreedError on every
    rank naming the cause when any rank could not make it (e.g. no working osc component
    between nodes). A window made on some ranks only is left alone: freeing it would be a
    collective the others never join."""
    try:
        obj, err = make(), None
    except MPI.Exception as e:
        obj, err = None, e.Get_error_string()
    errors = [x for x in comm.allgather(err) if x]
    if errors:
        raise AgreedError(NO_RMA.format(error=errors[0].strip()))
    return obj


def allocate(comm, nbytes: int, disp_unit: int):
    """Collective: an RMA window of nbytes on every rank (see agreed_window)."""
    return agreed_window(comm, lambda: _win_allocate(nbytes, disp_unit, comm))


def _alloc(comm, count: int, itemsize: int):
    win = allocate(comm, count * itemsize, itemsize)
    dtype = np.float32 if itemsize == 4 else np.int64
    local = np.frombuffer(win.tomemory(), dtype=dtype, count=count) if count else np.empty(0, dtype)
    local[:] = 0
    return win, local


class ShardedVector:
    """Collective: a float32 vector of `n` elements sharded over `owners`."""

    def __init__(self, comm: MPI.Intracomm, n: int, owners: list[int], *, state_slots: int = 0,
                 slots: int = 0):
        self.comm, self.n, self.owners = comm, n, list(owners)
        self.rank = comm.Get_rank()
        self.bounds = [shard_bounds(n, len(owners), i) for i in range(len(owners))]
        self.state_slots, self.slots = state_slots, slots
        mine = self.owners.index(self.rank) if self.rank in self.owners else None
        m = (self.bounds[mine][1] - self.bounds[mine][0]) if mine is not None else 0
        own = mine is not None
        self.win_params, self.local_params = _alloc(comm, m, 4)
        self.win_state, self.local_state = _alloc(comm, state_slots * m + 1 if own else 0, 4)
        self.win_accum, self.local_accum = _alloc(comm, slots * m, 4)
        self.win_ctl, self.local_ctl = _alloc(comm, slots + 1 if own else 0, 8)
        comm.Barrier()  # zeroed everywhere before anyone touches a remote window

    def shards(self):
        """(index, owner rank, lo, hi) of every shard."""
        return [(i, o, lo, hi) for i, (o, (lo, hi)) in enumerate(zip(self.owners, self.bounds))]

    # -- element data ------------------------------------------------------------------
    def get(self, out: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Read elements [lo, hi) of the vector into out (float32, hi-lo long)."""
        hi = self.n if hi is None else hi
        for _, owner, a, b in self.shards():
            s, e = max(a, lo), min(b, hi)
            if s < e:
                self.get_shard(owner, a, out[s - lo:e - lo], s - a)
        return out

    def get_shard(self, owner: int, shard_lo: int, out: np.ndarray, disp: int = 0,
                  version_index: int | None = None) -> int | None:
        """Read (part of) owner's shard; with version_index, also ctl[version_index] read
        under the same shared lock, so the pair is consistent (appliers bump versions
        while they hold the exclusive lock)."""
        self.win_params.Lock(owner, MPI.LOCK_SHARED)
        try:
            version = self.read_ctl(owner, version_index) if version_index is not None else None
            _get(self.win_params, out, owner, disp)
            TRAFFIC.add(out.nbytes)
        finally:
            self.win_params.Unlock(owner)
        return version

    def put_all(self, values: np.ndarray):
        """Write the whole vector (initialisation; caller guarantees no concurrent use)."""
        for _, owner, a, b in self.shards():
            self.win_params.Lock(owner, MPI.LOCK_EXCLUSIVE)
            _put(self.win_params, np.ascontiguousarray(values[a:b]), owner)
            self.win_params.Unlock(owner)
            TRAFFIC.add(4 * (b - a))

    def add_to_params(self, owner: int, disp: int, delta: np.ndarray):
        """params[disp:disp+len(delta)] += delta on owner, atomically w.r.t. readers
        (exclusive lock: MPI makes Accumulate atomic only against other accumulates)."""
        self.win_params.Lock(owner, MPI.LOCK_EXCLUSIVE)
        _accumulate(self.win_params, delta, owner, disp)
        self.win_params.Unlock(owner)
        TRAFFIC.add(delta.nbytes)

    def read_all(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(params, state as (state_slots, n), step) gathered from every owner (any rank)."""
        params = self.get(np.empty(self.n, np.float32))
        state = np.empty((self.state_slots, self.n), np.float32)
        step = 0.0
        for _, owner, a, b in self.shards():
            m = b - a
            buf = np.empty(self.state_slots * m + 1, np.float32)
            self.win_state.Lock(owner, MPI.LOCK_SHARED)
            _get(self.win_state, buf, owner)
            self.win_state.Unlock(owner)
            TRAFFIC.add(buf.nbytes)
            state[:, a:b] = buf[:-1].reshape(self.state_slots, m)
            step = float(buf[-1])
        return params, state, step

    def write_all(self, params: np.ndarray, state: np.ndarray | None, step: float) -> None:
        """Set every shard's params and optimizer state (resharding a checkpoint)."""
        self.put_all(params)
        for _, owner, a, b in self.shards():
            m = b - a
            buf = np.zeros(self.state_slots * m + 1, np.float32)
            if state is not None and state.shape == (self.state_slots, self.n):
                buf[:-1] = state[:, a:b].reshape(-1)
            buf[-1] = step
            self.win_state.Lock(owner, MPI.LOCK_EXCLUSIVE)
            _put(self.win_state, buf, owner)
            self.win_state.Unlock(owner)
            TRAFFIC.add(buf.nbytes)

    def accumulate(self, owner: int, slot: int, m: int, delta: np.ndarray):
        """Add delta (a whole shard) into accumulator `slot` of owner and wait until it landed."""
        self.win_accum.Lock(owner, MPI.LOCK_SHARED)
        _accumulate(self.win_accum, delta, owner, slot * m)
        self.win_accum.Unlock(owner)  # unlock = remote completion
        TRAFFIC.add(delta.nbytes)

    # -- int64 control -----------------------------------------------------------------
    def fetch_add(self, owner: int, index: int, value: int) -> int:
        """Atomically add value to ctl[index] of owner; returns the previous value."""
        res = np.zeros(1, np.int64)
        self.win_ctl.Lock(owner, MPI.LOCK_SHARED)
        self.win_ctl.Fetch_and_op([np.array([value], np.int64), I64], [res, I64], owner, index, op=MPI.SUM)
        self.win_ctl.Unlock(owner)
        return int(res[0])

    def read_ctl(self, owner: int, index: int) -> int:
        res = np.zeros(1, np.int64)
        self.win_ctl.Lock(owner, MPI.LOCK_SHARED)
        self.win_ctl.Fetch_and_op([np.zeros(1, np.int64), I64], [res, I64], owner, index, op=MPI.NO_OP)
        self.win_ctl.Unlock(owner)
        return int(res[0])

    def write_ctl(self, owner: int, index: int, value: int):
        self.win_ctl.Lock(owner, MPI.LOCK_SHARED)
        self.win_ctl.Accumulate([np.array([value], np.int64), I64], owner, target=(index, 1, I64),
                                op=MPI.REPLACE)
        self.win_ctl.Unlock(owner)

    # -- read-modify-write of a shard ----------------------------------------------------
    def modify(self, owner: int, m: int, fn, accum_slot: int | None = None, on_done=None):
        """Apply fn(params, state, accum) to owner's shard under exclusive locks.

        fn gets local float32 copies (accum is None unless accum_slot is given), changes
        params and state in place; they are written back, the accumulator slot is
        cleared and on_done() runs (e.g. a version bump) before the locks are released.
        """
        params = np.empty(m, np.float32)
        state = np.empty(self.state_slots * m + 1, np.float32)
        accum = np.empty(m, np.float32) if accum_slot is not None else None
        self.win_params.Lock(owner, MPI.LOCK_EXCLUSIVE)
        self.win_state.Lock(owner, MPI.LOCK_EXCLUSIVE)
        try:
            _get(self.win_params, params, owner)
            _get(self.win_state, state, owner)
            if accum is not None:
                self.win_accum.Lock(owner, MPI.LOCK_EXCLUSIVE)
                _get(self.win_accum, accum, owner, accum_slot * m)
                self.win_accum.Flush(owner)
            self.win_params.Flush(owner)
            self.win_state.Flush(owner)
            fn(params, state, accum)
            _put(self.win_params, params, owner)
            _put(self.win_state, state, owner)
            if accum is not None:
                accum[:] = 0
                _put(self.win_accum, accum, owner, accum_slot * m)
                self.win_accum.Unlock(owner)
                accum = None
            self.win_params.Flush(owner)
            self.win_state.Flush(owner)
            TRAFFIC.add(2 * (params.nbytes + state.nbytes) + (2 * m * 4 if accum_slot is not None else 0))
            if on_done is not None:
                on_done()
        finally:
            if accum is not None:  # fn failed: do not leak the accumulator lock
                self.win_accum.Unlock(owner)
            self.win_state.Unlock(owner)
            self.win_params.Unlock(owner)

    def free(self):
        for w in (self.win_params, self.win_state, self.win_accum, self.win_ctl):
            w.Free()
