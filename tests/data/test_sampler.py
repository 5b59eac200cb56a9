"""Distributed sampler: exactly once per epoch, deterministic, resumable, uneven sizes."""

import numpy as np
import pytest

from mpitrain.data.sampler import DistributedSampler, DynamicSampler

pytestmark = pytest.mark.mpi
SHUFFLES = ["global", "shard", "none"]


def all_ranks(n, size, batch, seed, shuffle, epoch):
    """Per step, the indices of every rank (simulated in-process)."""
    samplers = [DistributedSampler(n, size, r, batch, seed, shuffle) for r in range(size)]
    steps = {s.steps_per_epoch for s in samplers}
    assert len(steps) == 1, "every rank must run the same number of steps"
    per_rank = [list(s.epoch(epoch)) for s in samplers]
    return per_rank


@pytest.mark.parametrize("shuffle", SHUFFLES)
@pytest.mark.parametrize("n, size, batch", [(10, 1, 3), (10, 3, 2), (17, 4, 5), (5, 4, 1), (100, 7, 8),
                                            (8, 2, 4)])
def test_exactly_once_at_every_size(shuffle, n, size, batch):
    for epoch in range(3):
        per_rank = all_ranks(n, size, batch, 42, shuffle, epoch)
        seen = np.concatenate([b.indices for rank in per_rank for b in rank])
        assert sorted(seen.tolist()) == list(range(n))
        for step in zip(*per_rank):  # global_count is the same on all ranks and correct
            assert {b.global_count for b in step} == {sum(len(b.indices) for b in step)}
            assert all(len(b.indices) <= batch for b in step)


def test_exactly_once_across_real_ranks(world):
    for shuffle in SHUFFLES:
        s = DistributedSampler(103, world.size, world.rank, 4, 7, shuffle)
        mine = np.concatenate([b.indices for b in s.epoch(2)] + [np.empty(0, dtype=np.int64)])
        allidx = np.concatenate(world.allgather(mine))
        assert sorted(allidx.tolist()) == list(range(103)), shuffle


@pytest.mark.parametrize("shuffle", SHUFFLES)
def test_deterministic_and_resumable(shuffle):
    a = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, shuffle).epoch(5)]
    b = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, shuffle).epoch(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # after 2 steps of batch 4 on 3 ranks: 2 * 4 * 3 global samples done
    resumed = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, shuffle).epoch(5, start_sample=2 * 4 * 3)]
    assert all(np.array_equal(x, y) for x, y in zip(a[2:], resumed)) and len(resumed) == len(a) - 2
    if shuffle != "none":
        other = [b.indices for b in DistributedSampler(50, 3, 1, 4, 9, shuffle).epoch(6)]
        assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def test_unknown_shuffle():
    with pytest.raises(ValueError, match="unknown shuffle"):
        DistributedSampler(10, 1, 0, 2, 0, "random")


def test_global_batches_do_not_depend_on_world_size():
    """N ranks with batch B see the same global batches as 1 process with batch N*B."""
    one = [b.indices for b in DistributedSampler(37, 1, 0, 12, 3, "global").epoch(1)]
    for size in (2, 3, 4, 6):
        per_rank = all_ranks(37, size, 12 // size, 3, "global", 1)
        for step, ref in enumerate(one):
            assert np.array_equal(np.concatenate([r[step].indices for r in per_rank]), ref)


@pytest.mark.parametrize("old, new", [(2, 1), (2, 4), (4, 2), (3, 5)])
def test_sampler_resumes_across_world_sizes_exactly_once(old, new):
    n, b, seed, epoch = 101, 4, 3, 1
    done = 0
    seen = []
    for r in range(old):  # 3 steps at the old size
        s = DistributedSampler(n, old, r, b, seed, "global")
        for i, batch in enumerate(s.epoch(epoch)):
            if i == 3:
                break
            seen.append(batch.indices)
    done = 3 * b * old
    for r in range(new):
        s = DistributedSampler(n, new, r, b, seed, "global")
        seen += [batch.indices for batch in s.epoch(epoch, start_sample=done)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(n))


def test_dynamic_sampler_exactly_once_across_real_ranks(world):
    s = DynamicSampler(world, 103, 4, seed=5)
    try:
        for epoch in range(2):  # one shared counter across epochs
            batches = list(s.epoch(epoch))
            assert all(b.global_count == 4 * world.size for b in batches)
            mine = np.concatenate([b.indices for b in batches] + [np.empty(0, dtype=np.int64)])
            allidx = np.concatenate(world.allgather(mine))
            assert sorted(allidx.tolist()) == list(range(103))
    finally:
        world.barrier()
        s.close()


def test_dynamic_sampler_resumes_at_epoch_boundaries_only(world):
    s = DynamicSampler(world, 103, 4, seed=5)
    try:
        with pytest.raises(ValueError, match="epoch boundaries"):
            next(s.epoch(0, start_sample=8))
    finally:
        s.close()
