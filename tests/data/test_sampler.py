"""Distributed sampler: exactly once per epoch, deterministic, resumable, uneven sizes."""

import numpy as np
import pytest

from mpitrain.data.sampler import DistributedSampler, shard_bounds

pytestmark = pytest.mark.mpi
SCOPES = ["global", "shard", "none"]


def all_ranks(n, size, batch, seed, scope, epoch):
    """Per step, the indices of every rank (simulated in-process)."""
    samplers = [DistributedSampler(n, size, r, batch, seed, scope) for r in range(size)]
    steps = {s.steps_per_epoch for s in samplers}
    assert len(steps) == 1, "every rank must run the same number of steps"
    per_rank = [list(s.epoch(epoch)) for s in samplers]
    return per_rank


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("n, size, batch", [(10, 1, 3), (10, 3, 2), (17, 4, 5), (5, 4, 1), (100, 7, 8),
                                            (8, 2, 4)])
def test_exactly_once_at_every_size(scope, n, size, batch):
    for epoch in range(3):
        per_rank = all_ranks(n, size, batch, 42, scope, epoch)
        seen = np.concatenate([b.indices for rank in per_rank for b in rank])
        assert sorted(seen.tolist()) == list(range(n))
        for step in zip(*per_rank):  # global_count is the same on all ranks and correct
            assert {b.global_count for b in step} == {sum(len(b.indices) for b in step)}
            assert all(len(b.indices) <= batch for b in step)


def test_exactly_once_across_real_ranks(world):
    for scope in SCOPES:
        s = DistributedSampler(103, world.size, world.rank, 4, 7, scope)
        mine = np.concatenate([b.indices for b in s.epoch(2)] + [np.empty(0, dtype=np.int64)])
        allidx = np.concatenate(world.comm.allgather(mine))
        assert sorted(allidx.tolist()) == list(range(103)), scope


@pytest.mark.parametrize("scope", SCOPES)
def test_deterministic_and_resumable(scope):
    a = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, scope).epoch(5)]
    b = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, scope).epoch(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    resumed = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, scope).epoch(5, start_step=2)]
    assert all(np.array_equal(x, y) for x, y in zip(a[2:], resumed)) and len(resumed) == len(a) - 2
    if scope != "none":
        other = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, scope).epoch(6)]
        assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def test_global_batches_do_not_depend_on_world_size():
    """N ranks with batch B see the same global batches as 1 process with batch N*B."""
    one = [b.indices for b in DistributedSampler(37, 1, 0, 12, 3, "global").epoch(1)]
    for size in (2, 3, 4, 6):
        per_rank = all_ranks(37, size, 12 // size, 3, "global", 1)
        for step, ref in enumerate(one):
            assert np.array_equal(np.concatenate([r[step].indices for r in per_rank]), ref)


def test_shard_bounds_cover_range():
    for n in (0, 1, 7, 100):
        for size in (1, 3, 8):
            b = [shard_bounds(n, size, r) for r in range(size)]
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(size - 1))
            assert max(hi - lo for lo, hi in b) - min(hi - lo for lo, hi in b) <= 1


def test_dynamic_sampler_exactly_once_across_real_ranks(world):
    from mpitrain.data.sampler import DynamicSampler

    s = DynamicSampler(world, 103, 4, seed=5, epochs=2)
    try:
        for epoch in range(2):
            batches = list(s.epoch(epoch))
            assert all(b.global_count == 4 * world.size for b in batches)
            mine = np.concatenate([b.indices for b in batches] + [np.empty(0, dtype=np.int64)])
            allidx = np.concatenate(world.comm.allgather(mine))
            assert sorted(allidx.tolist()) == list(range(103))
    finally:
        world.comm.Barrier()
        s.close()
