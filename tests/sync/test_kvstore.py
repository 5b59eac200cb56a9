"""The one-sided parameter store: KVStore API, store-side optimizers, progress, staleness."""

import time

import numpy as np
import pytest
import torch

from mpitrain import KVStore
from mpitrain.comm.rma import ShardedVector

pytestmark = pytest.mark.mpi


def grads_for(rank, step, n=37):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, generator=g)


def reference(world, steps, opt_factory, n=37, mean=True):
    """One torch optimizer over the whole vector, fed the mean (or each) gradient."""
    w = torch.nn.Parameter(torch.linspace(-1, 1, n))
    opt = opt_factory([w])
    for step in range(steps):
        gs = [grads_for(r, step, n) for r in range(world.size)]
        w.grad = torch.stack(gs).mean(0) if mean else None
        opt.step()
    return w.detach()


@pytest.mark.parametrize("name, kw, factory", [
    ("sgd", {"lr": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adam", {"lr": 0.01}, lambda p: torch.optim.Adam(p, lr=0.01)),
])
def test_sync_push_pull_equals_one_optimizer_on_the_mean(world, name, kw, factory):
    kv = KVStore(world, "sync", optimizer=name, **kw)
    try:
        kv.init("w", torch.linspace(-1, 1, 37) * (world.rank + 1))  # rank 0's value wins
        out = torch.empty(37)
        for step in range(4):
            kv.push("w", grads_for(world.rank, step))
            kv.pull("w", out=out)
        torch.testing.assert_close(out, reference(world, 4, factory), rtol=1e-5, atol=1e-6)
        assert kv.staleness_seen == [0, 0, 0, 0]
    finally:
        kv.close()


def test_async_applies_every_push(world):
    kv = KVStore(world, "async", optimizer="sgd", lr=1.0)
    try:
        kv.init("w", torch.zeros(10))
        kv.push("w", torch.full((10,), float(world.rank + 1)))
        kv.barrier()
        out = kv.pull("w", out=torch.empty(10))
        n = world.size
        assert torch.equal(out, torch.full((10,), -float(n * (n + 1) // 2)))
    finally:
        kv.close()


def test_unknown_key_and_bad_mode(world):
    from mpitrain.errors import UserError

    with pytest.raises(UserError, match="mode must be"):
        KVStore(world, "eventual")
    kv = KVStore(world, "sync")
    try:
        with pytest.raises(KeyError, match="not initialised"):
            kv.pull("nope", out=torch.empty(1))
    finally:
        kv.close()


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
        world.comm.Barrier()
        if world.rank == 0:
            assert np.all(vec.local_accum == 20 * (world.size - 1))
    finally:
        world.comm.Barrier()
        vec.free()


def test_ssp_staleness_bound_and_read_my_writes(world):
    s = 2
    kv = KVStore(world, "sync", optimizer="sgd", lr=1.0, staleness=s, rescale=1.0)
    try:
        kv.init("w", torch.zeros(8))
        out = torch.empty(8)
        for step in range(12):
            if world.rank == world.size - 1 and world.size > 1:
                time.sleep(0.02)  # a straggler
            kv.push("w", torch.ones(8))
            kv.pull("w", out=out)
            # own updates are always visible: at least my step+1 pushes of -1
            assert out[0].item() <= -(step + 1)
        assert max(kv.staleness_seen) <= s
        if world.size > 1:
            seen = world.comm.allgather(max(kv.staleness_seen))
            assert max(seen) > 0, "with a straggler some reads must be stale (else the test proves nothing)"
        kv.barrier()
        kv.staleness = 0
        final = kv.pull("w", out=torch.empty(8))
        assert torch.equal(final, torch.full((8,), -12.0 * world.size))
    finally:
        kv.close()
