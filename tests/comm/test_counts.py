"""Counts beyond a C int: every MPI path splits its buffers into calls of at most
counts.MAX_COUNT elements (forced to 7 here) and gets the result of one unsplit call;
one test moves a real 2^31 + 8 byte tensor where memory allows."""

import collections
import os
import threading

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpitrain.comm import buffers, counts
from mpitrain.comm.collectives import GradBuckets, NodeHierarchy
from mpitrain.comm.rma import ShardedVector

pytestmark = pytest.mark.mpi

LIMIT = 7


def agreed(world, ok: bool, what: str) -> None:
    """Assert on every rank at once: a rank that fails alone would leave the others waiting."""
    failed = [r for r, good in enumerate(world.comm.allgather(bool(ok))) if not good]
    assert not failed, f"{what} (rank(s) {failed})"


class CountingComm:
    """A communicator that records the bytes per rank of each tensor collective it makes."""

    def __init__(self, comm):
        self._comm = comm
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _record(self, name, spec, per_rank=1):
        mem, *rest = spec
        count, datatype = rest if len(rest) == 2 else (len(mem) // per_rank, rest[0])
        self.calls.append((name, count * datatype.Get_size()))

    def Allreduce(self, send, recv, op=MPI.SUM):
        self._record("Allreduce", recv)
        return self._comm.Allreduce(send, recv, op=op)

    def Bcast(self, buf, root=0):
        self._record("Bcast", buf)
        return self._comm.Bcast(buf, root=root)

    def Allgather(self, send, recv):
        self._record("Allgather", send)
        return self._comm.Allgather(send, recv)

    def Alltoall(self, send, recv):
        self._record("Alltoall", send, self._comm.Get_size())
        return self._comm.Alltoall(send, recv)

    def Iallreduce(self, send, recv, op=MPI.SUM):
        self._record("Iallreduce", recv)
        return self._comm.Iallreduce(send, recv, op=op)


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(counts, "MAX_COUNT", LIMIT)


def unlimited(fn):
    """fn() with no limit on the count (the reference result)."""
    saved, counts.MAX_COUNT = counts.MAX_COUNT, counts.INT_MAX
    try:
        return fn()
    finally:
        counts.MAX_COUNT = saved


def test_chunks_cover_the_range(small_limit):
    assert counts.chunks(0) == []
    assert counts.chunks(7) == [(0, 7)]
    assert counts.chunks(15) == [(0, 7), (7, 14), (14, 15)]


def test_limit_from_the_environment():
    from mpitrain.errors import UserError

    assert counts._count_limit(None) == counts._count_limit("") == 2**31 - 1 and counts._count_limit("7") == 7
    for bad in ("0", "-3", "x", str(2**31)):
        with pytest.raises(UserError, match="MPITRAIN_MAX_COUNT"):
            counts._count_limit(bad)


def _data(world, n, dtype, rank=None):
    """Distinct, exactly representable values for each rank and position."""
    r = world.rank if rank is None else rank
    base = (torch.arange(n) % 11 + 3 * r + 1)
    if dtype == torch.bool:
        return (base % 2).bool()
    if dtype.is_complex:
        return torch.complex(base.double(), -base.double()).to(dtype)
    return base.to(dtype)


def _words_per_call(dtype):
    return LIMIT * min(8, torch.empty(0, dtype=dtype).element_size())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8, torch.float16,
                                   torch.bfloat16])
def test_allreduce_in_pieces(world, small_limit, dtype):
    comm = CountingComm(world.comm)
    t = _data(world, 23, dtype)
    ref = unlimited(lambda: buffers.allreduce_(world.comm, t.clone()))
    buffers.allreduce_(comm, t)
    expect = sum(_data(world, 23, torch.float64, r) for r in range(world.size)).to(dtype)
    agreed(world, torch.equal(t, ref) and torch.equal(t, expect), f"allreduce_ {dtype}")
    per_call = LIMIT * (4 if dtype in buffers.VIA_FLOAT32 else t.element_size())
    agreed(world, len(comm.calls) == 4 and all(b <= per_call for _, b in comm.calls), f"calls {comm.calls}")


def test_hierarchical_allreduce_in_pieces(world, small_limit):
    """NodeHierarchy's Reduce/Allreduce/Bcast get the pieces (allreduce_ splits before `via`)."""
    h = NodeHierarchy(world.comm, color=world.rank // 2)
    try:
        seen = []

        class Spy:
            def allreduce_(self, buf):
                seen.append(len(buf[0]))
                h.allreduce_(buf)
        t = _data(world, 30, torch.float64)
        buffers.allreduce_(world.comm, t, via=Spy())
        expect = sum(_data(world, 30, torch.float64, r) for r in range(world.size))
        agreed(world, torch.equal(t, expect) and seen == [7, 7, 7, 7, 2], f"hierarchical {seen}")
    finally:
        h.free()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int16, torch.bool,
                                   torch.complex128, torch.uint8])
def test_bcast_in_pieces(world, small_limit, dtype):
    comm = CountingComm(world.comm)
    root = world.size - 1
    t = _data(world, 30, dtype).reshape(5, 6)
    ref = unlimited(lambda: buffers.bcast_(world.comm, t.clone(), root=root))
    buffers.bcast_(comm, t, root=root)
    agreed(world, torch.equal(t, ref) and torch.equal(t, _data(world, 30, dtype, root).reshape(5, 6)),
           f"bcast_ {dtype}")
    agreed(world, len(comm.calls) > 1 and all(b <= _words_per_call(dtype) for _, b in comm.calls),
           f"calls {comm.calls}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.complex128, torch.bool])
@pytest.mark.parametrize("shape", [(23,), (4, 5), (3,), ()])
def test_allgather_in_pieces(world, small_limit, dtype, shape):
    comm = CountingComm(world.comm)
    n = int(np.prod(shape))
    t = _data(world, n, dtype).reshape(shape)
    ref = unlimited(lambda: buffers.allgather(world.comm, t))
    got = buffers.allgather(comm, t)
    expect = torch.stack([_data(world, n, dtype, r).reshape(shape) for r in range(world.size)])
    agreed(world, got.shape == (world.size, *shape) and torch.equal(got, ref) and torch.equal(got, expect),
           f"allgather {dtype} {shape}")
    words = n * t.element_size() // min(8, t.element_size())
    agreed(world, len(comm.calls) == len(counts.chunks(words))
           and all(b <= _words_per_call(dtype) for _, b in comm.calls), f"calls {comm.calls}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.complex128])
@pytest.mark.parametrize("row", [(17,), (3, 4), (2,)])
def test_alltoall_in_pieces(world, small_limit, dtype, row):
    comm = CountingComm(world.comm)
    n, size = int(np.prod(row)), world.size
    # rank r's row j: values that name (r, j)
    t = torch.stack([_data(world, n, dtype, world.rank * size + j).reshape(row) for j in range(size)])
    ref = unlimited(lambda: buffers.alltoall(world.comm, t))
    got = buffers.alltoall(comm, t)
    expect = torch.stack([_data(world, n, dtype, i * size + world.rank).reshape(row) for i in range(size)])
    agreed(world, torch.equal(got, ref) and torch.equal(got, expect), f"alltoall {dtype} {row}")
    agreed(world, all(b <= _words_per_call(dtype) for _, b in comm.calls), f"calls {comm.calls}")


def test_alltoall_needs_a_row_per_rank(world):
    with pytest.raises(ValueError, match="shape \\(ranks="):
        buffers.alltoall(world.comm, torch.zeros(world.size + 1, 2))


def test_iallreduce_in_pieces(world, small_limit):
    t = _data(world, 20, torch.float32)
    reqs = buffers.iallreduce_(world.comm, t)
    MPI.Request.Waitall(reqs)
    expect = sum(_data(world, 20, torch.float64, r) for r in range(world.size)).float()
    agreed(world, len(reqs) == 3 and torch.equal(t, expect), f"iallreduce_ {len(reqs)} requests")


@pytest.mark.parametrize("overlap", ["nonblocking", "thread", "none"])
def test_buckets_in_pieces(world, small_limit, overlap):
    """Every overlap mode gives the unsplit sums (integer-valued gradients: exact)."""
    def grads():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-3, 4, p.shape))
        bk = GradBuckets(model.parameters(), world, bucket_bytes=64, first_bucket_bytes=32, overlap=overlap)
        try:
            for _ in range(2):
                bk.zero_()
                (model(torch.ones(2, 5) * (world.rank + 1)).sum() * 4).backward()
                bk.finish()
            return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        finally:
            bk.close()
    got = grads()
    ref = unlimited(grads)
    agreed(world, torch.equal(got, ref), f"buckets {overlap}")


def test_world_sum_in_pieces(world, small_limit):
    got = world.sum(np.arange(20.0) + world.rank)
    n = world.size
    agreed(world, np.array_equal(got, n * np.arange(20.0) + n * (n - 1) / 2), "World.sum")
    agreed(world, np.array_equal(world.max(np.arange(20.0) * (world.rank + 1)), np.arange(20.0) * n), "World.max")


class CountingWin:
    """A window that records the target count of each Get, Put and Accumulate."""

    def __init__(self, win, calls):
        self._win, self._calls = win, calls

    def __getattr__(self, name):
        attr = getattr(self._win, name)
        if name in ("Get", "Put", "Accumulate"):
            def op(origin, rank, target, **kw):
                self._calls.append(target[1])
                return attr(origin, rank, target, **kw)
            return op
        return attr


def test_rma_in_pieces(world, small_limit):
    """Put, Get and Accumulate of shards longer than the limit (at any split)."""
    n, slots = 53, 2
    vec = ShardedVector(world.comm, n, list(range(world.size)), state_slots=slots, slots=2)
    windows = vec.win_params, vec.win_state, vec.win_accum
    calls = []
    vec.win_params, vec.win_state, vec.win_accum = (CountingWin(w, calls) for w in windows)
    try:
        params = np.arange(n, dtype=np.float32)
        state = np.arange(slots * n, dtype=np.float32).reshape(slots, n) / 4
        if world.is_root:
            vec.write_all(params, state, 3.0)
        world.barrier()
        got_params, got_state, step = vec.read_all()
        ok = np.array_equal(got_params, params) and np.array_equal(got_state, state) and step == 3.0
        agreed(world, ok, "write_all / read_all")
        world.barrier()
        for _, owner, a, b in vec.shards():
            vec.accumulate(owner, 1, b - a, np.full(b - a, world.rank + 1, np.float32))
            vec.add_to_params(owner, 0, np.ones(b - a, np.float32))
        world.barrier()
        got = vec.get(np.empty(n, np.float32))
        agreed(world, np.array_equal(got, params + world.size), "add_to_params / get")
        mine = [(o, b - a) for _, o, a, b in vec.shards() if o == world.rank]
        total = world.size * (world.size + 1) / 2
        seen = []

        def apply(p, s, acc):
            seen.append(acc.copy())
            p += acc
        for owner, m in mine:
            vec.modify(owner, m, apply, accum_slot=1)
        ok = all(np.all(acc == total) for acc in seen) and np.all(vec.local_accum == 0)
        agreed(world, ok, "modify")
        world.barrier()
        lo, hi = vec.bounds[vec.owners.index(world.rank)]
        agreed(world, np.array_equal(vec.local_params, params[lo:hi] + world.size + total), "modify wrote back")
        agreed(world, calls and max(calls) <= LIMIT, f"RMA counts {sorted(set(calls))}")
    finally:
        world.barrier()
        vec.win_params, vec.win_state, vec.win_accum = windows
        vec.free()


# -- stager cache -------------------------------------------------------------------------------

@pytest.fixture
def empty_stager_cache(monkeypatch):
    monkeypatch.setattr(buffers, "_STAGERS", collections.OrderedDict())
    monkeypatch.setattr(buffers, "_STAGERS_BYTES", 0)


def test_stager_cache_is_bounded(world, monkeypatch, empty_stager_cache):
    """Host mirrors of every size ever moved (here float16 sums, mirrored in float32 on the
    CPU) stay within STAGER_CACHE_BYTES, least recently used dropped first."""
    monkeypatch.setattr(buffers, "STAGER_CACHE_BYTES", 1000)
    for n in range(10, 200, 10):
        buffers.allreduce_(world.comm, torch.ones(n, dtype=torch.float16))
    cached = sum(st.nbytes for st in buffers._STAGERS.values())
    ok = cached == buffers._STAGERS_BYTES <= 1000 and cached > 1000 - 4 * 200
    agreed(world, ok, f"{cached} bytes cached in {len(buffers._STAGERS)} stagers")
    small = torch.ones(8, dtype=torch.float16)
    agreed(world, buffers.stager_for(small) is buffers.stager_for(small), "a cached stager is reused")
    big = torch.ones(300, dtype=torch.float16)  # 1200 bytes: made for the call, not kept
    buffers.allreduce_(world.comm, big)
    agreed(world, buffers._STAGERS_BYTES <= 1000 and torch.equal(big, torch.full((300,), world.size,
                                                                              dtype=torch.float16)), "too big")
    # each thread gets its own buffers (a comm thread and the training thread never share one)
    other = []
    th = threading.Thread(target=lambda: other.append(buffers.stager_for(small)))
    th.start()
    th.join()
    agreed(world, other[0] is not buffers.stager_for(small), "per thread")


def test_world_passes_the_agreed_path(world, monkeypatch):
    """allgather/alltoall take the job's CUDA path like allreduce_ (issue 25 (10))."""
    seen = []
    monkeypatch.setattr(buffers, "allgather", lambda comm, t, direct=None: seen.append(("allgather", direct)))
    monkeypatch.setattr(buffers, "alltoall", lambda comm, t, direct=None: seen.append(("alltoall", direct)))
    for direct in (False, True):
        monkeypatch.setattr(world, "direct_cuda", direct)
        world.allgather_tensor(torch.zeros(2))
        world.alltoall_tensor(torch.zeros(world.size))
    assert seen == [("allgather", False), ("alltoall", False), ("allgather", True), ("alltoall", True)]


# -- a real tensor beyond 2^31 bytes ------------------------------------------------------------

BIG = 2**31 + 8  # bytes (uint8 elements): more than a C int counts


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.timeout(120)
def test_bcast_and_allreduce_beyond_int_max(world):
    """A 2^31 + 8 byte uint8 tensor (one more piece than INT_MAX) broadcast and summed in
    place. Runs at 1-2 ranks where every rank of the node has 3 GiB free (else skipped
    everywhere alike): about 5 s at 1 rank, 11 s at 2 here."""
    fits = world.size <= 2 and _available_bytes() > world.local_size * 3 * 2**30 and counts.MAX_COUNT == counts.INT_MAX
    if world.min(int(fits)) == 0:
        pytest.skip("needs 1-2 ranks and 3 GiB free memory per rank (and no forced MPITRAIN_MAX_COUNT)")
    t = torch.full((BIG,), world.rank + 7, dtype=torch.uint8)
    try:
        buffers.bcast_(world.comm, t)
        agreed(world, int(t.min()) == int(t.max()) == 7, "bcast_ beyond 2^31 bytes")  # no 2 GiB temporaries
        t.fill_(world.rank + 1)
        t[-1] = 2 * world.rank  # the last piece differs from the first
        buffers.allreduce_(world.comm, t)
        n = world.size
        ok = int(t[:-1].min()) == int(t[:-1].max()) == n * (n + 1) // 2 and int(t[-1]) == n * (n - 1)
        agreed(world, ok, "allreduce_ beyond 2^31 bytes")
    finally:
        del t


if os.environ.get("MPITRAIN_MAX_COUNT"):  # the limit must be the same on every rank
    def test_forced_limit_is_agreed(world):
        agreed(world, len(set(world.allgather(counts.MAX_COUNT))) == 1, "MPITRAIN_MAX_COUNT differs")
