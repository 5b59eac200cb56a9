"""One-sided windows: passive-target progress while the owner computes or sleeps."""

import time

import numpy as np
import pytest

from mpitrain.comm.rma import ShardedVector

pytestmark = pytest.mark.mpi


def test_passive_target_progress_with_a_sleeping_owner(world):
    """Others read and update rank 0's shard while rank 0 sleeps without any MPI call."""
    vec = ShardedVector(world.comm, 1000, owners=[0], slots=1)
    try:
        if world.rank == 0:
            time.sleep(3.0)  # no MPI calls here: progress must not depend on this rank
            done = vec.read_ctl(0, 1)
            assert done == world.size - 1, "the other ranks did not finish while rank 0 slept"
        else:
            for _ in range(20):
                vec.accumulate(0, 0, 1000, np.ones(1000, np.float32))
                vec.get(np.empty(1000, np.float32))
            vec.fetch_add(0, 1, 1)  # count myself as finished
        world.barrier()
        if world.rank == 0:
            assert np.all(vec.local_accum == 20 * (world.size - 1))
    finally:
        world.barrier()
        vec.free()


def test_read_all_and_write_all_reshard(world):
    """The whole vector and its optimizer state round-trip through any owner split."""
    n, slots = 23, 2
    owners = list(range(world.size))[::-1]  # reversed: shard i lives on rank size-1-i
    vec = ShardedVector(world.comm, n, owners, state_slots=slots)
    try:
        params = np.arange(n, dtype=np.float32)
        state = np.arange(slots * n, dtype=np.float32).reshape(slots, n) / 10
        if world.is_root:
            vec.write_all(params, state, 7.0)
        world.barrier()
        got_params, got_state, step = vec.read_all()
        assert np.array_equal(got_params, params) and np.array_equal(got_state, state) and step == 7.0
    finally:
        world.barrier()
        vec.free()
