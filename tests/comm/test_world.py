"""World: shard bounds, the small collectives every module uses, and traffic counting."""

import numpy as np
import pytest
import torch

from mpitrain.comm import World, shard_bounds

pytestmark = pytest.mark.mpi


def test_shard_bounds_cover_range():
    for n in (0, 1, 7, 100):
        for size in (1, 3, 8):
            b = [shard_bounds(n, size, r) for r in range(size)]
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(size - 1))
            assert max(hi - lo for lo, hi in b) - min(hi - lo for lo, hi in b) <= 1


def test_small_collectives(world):
    n, r = world.size, world.rank
    assert world.shard(10) == shard_bounds(10, n, r)
    assert world.sum(r + 1) == n * (n + 1) // 2
    assert np.array_equal(world.sum(np.array([1.0, r])), [n, n * (n - 1) / 2])
    assert world.max(r) == n - 1 and world.min(r) == 0
    assert world.any(r == n - 1) is True and world.any(False) is False
    assert world.allgather(r * 10) == [10 * i for i in range(n)]
    gathered = world.gather(r)
    assert gathered == (list(range(n)) if world.is_root else None)
    assert world.bcast("from root" if world.is_root else None) == "from root"
    world.barrier()


def test_tensor_collectives(world):
    n = world.size
    t = torch.full((5,), float(world.rank + 1))
    assert torch.equal(world.allreduce_(t), torch.full((5,), n * (n + 1) / 2))
    t = torch.full((5,), float(world.rank + 1))
    torch.testing.assert_close(world.average_(t), torch.full((5,), (n + 1) / 2))


class _WithBuffers(torch.nn.Module):
    def __init__(self, scalar_buffer=False):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("stats", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64) if scalar_buffer else torch.zeros(1))


def _check_broadcast_module(world, model):
    torch.manual_seed(world.rank)  # different on every rank ...
    for t in [*model.parameters(), *model.buffers()]:
        t.data.copy_(torch.randint(0, 100, t.shape).to(t.dtype) + world.rank)
    world.broadcast_module(model)  # ... until rank 0's parameters and buffers win
    flat = torch.cat([t.detach().reshape(-1).double() for t in [*model.parameters(), *model.buffers()]]).numpy()
    for other in world.allgather(flat):
        assert np.array_equal(other, flat)


def test_broadcast_module(world):
    _check_broadcast_module(world, _WithBuffers())


def test_broadcast_module_with_a_scalar_buffer(world):
    """e.g. BatchNorm's num_batches_tracked: a 0-dim tensor is flattened before its bytes go out."""
    _check_broadcast_module(world, _WithBuffers(scalar_buffer=True))


def test_bytes_sent_counts_tensor_payload(world):
    before = world.bytes_sent()
    world.allreduce_(torch.zeros(100, dtype=torch.float32))  # a collective counts its buffer once
    world.allreduce_(torch.zeros(10, dtype=torch.float16))  # half precision is reduced in float32
    world.sum(np.zeros(1000))  # small collectives on Python values are not traffic
    world.max(5)
    assert world.bytes_sent() - before == 400 + 40


def test_counter_hands_out_each_value_once(world):
    counter = world.counter(start=5)
    try:
        mine = [counter.next() for _ in range(3)]
        every = sorted(v for vals in world.allgather(mine) for v in vals)
        assert every == list(range(5, 5 + 3 * world.size))
    finally:
        world.barrier()
        counter.free()


def test_split_and_agree(world):
    from mpitrain.errors import AgreedError, UserError

    sub = world.split(world.rank % 2)
    try:
        assert sub.parent is world and sub.size == len(range(world.rank % 2, world.size, 2))
    finally:
        sub.free()

    def fail_on_last():
        if world.rank == world.size - 1:
            raise UserError("bad on the last rank")
        return "ok"
    if world.size == 1:
        with pytest.raises(AgreedError, match="^bad on the last rank$"):
            world.agree(fail_on_last)
    else:
        with pytest.raises(AgreedError, match=rf"bad on the last rank \(rank {world.size - 1}\)"):
            world.agree(fail_on_last)
    assert world.agree(lambda: world.rank) == world.rank


def test_a_world_over_one_rank(world):
    from mpi4py import MPI

    solo = World.create(MPI.COMM_SELF)
    try:
        assert solo.size == 1 and solo.rank == 0 and solo.is_root and solo.parent is None
        assert solo.sum(3) == 3
    finally:
        solo.free()


def test_placement_line_groups_ranks_by_node():
    from mpitrain.comm.world import describe_placement

    rows = [("vn1", 0, 2, 1), ("vn1", 1, 2, 1), ("vn2", 0, 2, 1), ("vn2", 1, 2, 1)]
    assert describe_placement(rows) == "2 nodes: vn1 ranks 0-1, vn2 ranks 2-3; 1 thread per rank"
    rows = [("a", 0, 2, 4), ("b", 0, 1, 2), ("a", 1, 2, 4)]  # round-robin, uneven nodes
    assert describe_placement(rows) == "2 nodes: a ranks 0,2, b ranks 1; 2/4 threads per rank"
    many = [(f"n{i}", 0, 1, 1) for i in range(10)]
    assert describe_placement(many).startswith("10 nodes: n0 ranks 0, ") and "... 2 more;" in describe_placement(many)
    # MPI's shared-memory split says one node where the hostnames say two (or the reverse)
    bad = [("a", 0, 2, 1), ("b", 1, 2, 1)]
    assert "warning: MPI's shared-memory groups differ from the hostnames on a, b" in describe_placement(bad)


def test_placement_on_this_machine(world):
    line = world.placement(threads=1)
    import socket

    assert line == (f"1 node: {socket.gethostname()} ranks {'0' if world.size == 1 else f'0-{world.size - 1}'}; "
                    "1 thread per rank")


def test_a_sub_worlds_ranks_count_the_whole_jobs_ranks_per_node(world):
    """A pipeline's or tensor group's replica World has one rank per node where the job
    has several: its cores per rank are still the job's share of the node."""
    sub = world.split(world.rank % 2)
    try:
        assert sub.cores_per_rank() == world.cores_per_rank()
    finally:
        sub.free()
