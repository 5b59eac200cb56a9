"""The one-sided parameter store (MXNet-shaped KVStore): push/pull semantics, store-side
optimizers, staleness, state round trips, errors."""

import dataclasses
import time

import numpy as np
import pytest
import torch

from mpitrain import kvstore
from mpitrain.errors import UserError

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
    kv = kvstore.create(world, "dist_sync")
    try:
        kv.set_optimizer(kvstore.StoreOptimizer(name=name, **kw))
        kv.init("w", torch.linspace(-1, 1, 37) * (world.rank + 1))  # rank 0's value wins
        out = torch.empty(37)
        for step in range(4):
            kv.push("w", grads_for(world.rank, step))
            kv.pull("w", out=out)
        torch.testing.assert_close(out, reference(world, 4, factory), rtol=1e-5, atol=1e-6)
        assert kv.pop_staleness() == [0, 0, 0, 0]
        assert kv.pop_staleness() == []  # popped
    finally:
        kv.close()


def test_async_applies_every_push(world):
    kv = kvstore.create(world, "dist_async")
    try:
        kv.set_optimizer(kvstore.StoreOptimizer("sgd", lr=1.0))  # rescale: 1 for dist_async
        kv.init("w", torch.zeros(10))
        kv.push("w", torch.full((10,), float(world.rank + 1)))
        kv.barrier()
        out = kv.pull("w", out=torch.empty(10))
        n = world.size
        assert torch.equal(out, torch.full((10,), -float(n * (n + 1) // 2)))
    finally:
        kv.close()


def test_properties(world):
    for kind in ("dist_sync", "dist_async", "dist_ssp"):
        kv = kvstore.create(world, kind)
        try:
            assert kv.type == kind and kv.rank == world.rank and kv.num_workers == world.size
        finally:
            kv.close()


def test_unknown_key_and_bad_type(world):
    with pytest.raises(UserError, match="type must be"):
        kvstore.create(world, "eventual")
    with pytest.raises(UserError, match="staleness"):
        kvstore.create(world, "dist_sync", staleness=2)  # staleness is for dist_ssp
    with pytest.raises(UserError, match="optimizer must be one of"):
        kvstore.StoreOptimizer("lamb")
    kv = kvstore.create(world, "dist_sync")
    try:
        with pytest.raises(UserError, match="not initialised"):
            kv.pull("nope", out=torch.empty(1))
        kv.init("w", torch.zeros(3))
        with pytest.raises(UserError, match="already initialised"):
            kv.init("w", torch.zeros(3))
        with pytest.raises(UserError, match="set_optimizer"):  # the state size is fixed at init
            kv.set_optimizer(kvstore.StoreOptimizer("adam"))
    finally:
        kv.close()


def test_use_after_close_is_an_error(world):
    kv = kvstore.create(world, "dist_sync")
    kv.init("w", torch.zeros(4))
    kv.close()
    kv.close()  # closing twice is harmless
    for use in (lambda: kv.push("w", torch.ones(4)), lambda: kv.pull("w", out=torch.empty(4)),
                lambda: kv.add("w", torch.ones(4)), lambda: kv.init("v", torch.zeros(4)),
                lambda: kv.set_optimizer(kvstore.StoreOptimizer()), kv.barrier, kv.state_dict):
        with pytest.raises(UserError, match="used after close"):
            use()


def test_ssp_staleness_bound_and_read_my_writes(world):
    s = 2
    kv = kvstore.create(world, "dist_ssp", staleness=s)
    try:
        kv.set_optimizer(kvstore.StoreOptimizer("sgd", lr=1.0, rescale=1.0))
        kv.init("w", torch.zeros(8))
        out = torch.empty(8)
        for step in range(12):
            if world.rank == world.size - 1 and world.size > 1:
                time.sleep(0.02)  # a straggler
            kv.push("w", torch.ones(8))
            kv.pull("w", out=out)
            # own updates are always visible: at least my step+1 pushes of -1
            assert out[0].item() <= -(step + 1)
        seen = kv.pop_staleness()
        assert len(seen) == 12 and max(seen) <= s
        if world.size > 1:
            worst = world.allgather(max(seen))
            assert max(worst) > 0, "with a straggler some reads must be stale (else the test proves nothing)"
        kv.barrier()
        final = kv.pull("w", out=torch.empty(8), fresh=True)
        assert torch.equal(final, torch.full((8,), -12.0 * world.size))
    finally:
        kv.close()


def _pushes(kv, world, steps, first=0, n=37):
    out = torch.empty(n)
    for step in range(first, first + steps):
        kv.push("w", grads_for(world.rank, step, n))
        kv.pull("w", out=out)
    return out


def _same_state(a, b):
    assert set(a) == set(b), (set(a), set(b))
    for k in a:
        assert np.array_equal(a[k], b[k]), k


OPT = kvstore.StoreOptimizer("sgd", lr=0.1, momentum=0.9)


def test_save_and_load_optimizer_states(world, shared_tmp):
    """The store's values and momentum buffers survive a file: a new store continues
    exactly where the saved one would have gone."""
    path = str(shared_tmp / "kv-state.h5")
    kv = kvstore.create(world, "dist_sync")
    try:
        kv.set_optimizer(OPT)
        kv.init("w", torch.linspace(-1, 1, 37))
        _pushes(kv, world, 3)
        kv.save_optimizer_states(path)
        saved = kv.state_dict()
        expect = _pushes(kv, world, 2, first=3)
    finally:
        kv.close()
    again = kvstore.create(world, "dist_sync")
    try:
        again.set_optimizer(OPT)
        again.init("w", torch.zeros(37))
        again.load_optimizer_states(path)
        _same_state(again.state_dict(), saved)
        if world.is_root:
            assert set(saved) == {"w.value", "w.optimizer", "w.step"} and saved["w.optimizer"].shape == (1, 37)
            assert np.abs(saved["w.optimizer"]).sum() > 0  # the momentum buffer is there
        got = _pushes(again, world, 2, first=3)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
    finally:
        again.close()


def test_state_dict_round_trips_across_world_sizes(world):
    """State saved by a store over N ranks loads into a store over fewer ranks (other
    shards) and back: the values, Adam moments and step come back exactly."""
    opt = kvstore.StoreOptimizer("adam", lr=0.01)
    kv = kvstore.create(world, "dist_sync")
    try:
        kv.set_optimizer(opt)
        kv.init("w", torch.linspace(-1, 1, 37))
        _pushes(kv, world, 3)
        saved = kv.state_dict()  # complete on rank 0, {} elsewhere
        assert bool(saved) == world.is_root
        if world.is_root:
            assert float(saved["w.step"]) == 3.0 and saved["w.optimizer"].shape == (2, 37)
        m = max(1, world.size - 1)  # a smaller world: ranks 0..m-1
        sub = world.split(0 if world.rank < m else 1)
        small_state = {}
        try:
            if world.rank < m:
                small = kvstore.create(sub, "dist_sync")
                try:
                    small.set_optimizer(opt)
                    small.init("w", torch.zeros(37))
                    small.load_state_dict(saved)  # rank 0 of sub is rank 0 of world
                    small_state = small.state_dict()
                finally:
                    small.close()
        finally:
            sub.free()
        if world.is_root:
            _same_state(small_state, saved)
        back = kvstore.create(world, "dist_sync")  # and back onto all ranks
        try:
            back.set_optimizer(opt)
            back.init("w", torch.zeros(37))
            back.load_state_dict(small_state)
            if world.is_root:
                _same_state(back.state_dict(), saved)
            else:
                assert back.state_dict() == {}
            # the restored store goes on exactly like the original
            got, expect = _pushes(back, world, 2, first=3), _pushes(kv, world, 2, first=3)
            torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
        finally:
            back.close()
    finally:
        kv.close()


def test_set_optimizer_changes_the_learning_rate(world):
    kv = kvstore.create(world, "dist_async")
    try:
        kv.set_optimizer(OPT)
        kv.init("w", torch.zeros(5))
        kv.set_optimizer(dataclasses.replace(OPT, lr=2.0, momentum=0.0))
        kv.push("w", torch.ones(5))
        kv.barrier()
        out = kv.pull("w", out=torch.empty(5))
        assert torch.equal(out, torch.full((5,), -2.0 * world.size))
    finally:
        kv.close()
