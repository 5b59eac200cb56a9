"""Parity: the distributed result equals its single-process / DDP / flat-allreduce equivalent."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpitrain.comm import buffers
from mpitrain.comm.collectives import GradBuckets
from mpitrain.data.sampler import DistributedSampler
from mpitrain.sync.base import broadcast_model
from mpitrain.train import train

from conftest import make_cfg

pytestmark = pytest.mark.mpi
STEPS = 8
# float32, k steps: N ranks sum partial batches then allreduce, 1 process sums the whole
# batch in one matmul; the association differs, so parameters agree to rounding only.
RTOL, ATOL = 1e-4, 1e-6


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def single_process_reference(cfg, digits_h5, steps):
    """What one process with batch N*B does on the same global batches (no MPI)."""
    import h5py
    from mpitrain.models import build_model, build_optimizer, build_schedule

    with h5py.File(digits_h5, "r") as f:
        x, y = f["train/x"][:].astype(np.float32), f["train/y"][:].astype(np.int64)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, x.shape[1:], 10)
    opt = build_optimizer(cfg.optim, model.parameters(), 1)
    size = MPI.COMM_WORLD.Get_size()
    sampler = DistributedSampler(len(y), 1, 0, cfg.train.batch_size * size, cfg.train.seed, "global")
    sched = build_schedule(cfg.optim, opt, sampler.steps_per_epoch, cfg.train.epochs)
    done = 0
    for epoch in range(cfg.train.epochs):
        for b in sampler.epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(model(torch.from_numpy(x[b.indices])), torch.from_numpy(y[b.indices])).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                return model
    return model


@pytest.mark.parametrize("model, optim", [("mlp", "sgd"), ("cnn", "adamw")])
def test_n_ranks_equal_one_process_with_n_times_batch(world, shared_tmp, digits_h5, model, optim):
    cfg = make_cfg(shared_tmp / "run", digits_h5, model={"name": model, "hidden": [32]},
                   data={"mode": "replicated"}, optim={"name": optim, "lr": 0.01, "warmup_epochs": 0.5},
                   train={"batch_size": 8, "max_steps": STEPS, "epochs": 2}, sync={"bucket_mb": 0.01,
                                                                                "first_bucket_mb": 0.001})
    _, dist_model = train(cfg, world, world.logger())
    ref = single_process_reference(cfg, digits_h5, STEPS)
    a, b = flat_params(dist_model), flat_params(ref)
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    # and all ranks hold the same parameters, bit for bit
    all_a = world.comm.allgather(a.numpy())
    assert all(np.array_equal(all_a[0], x) for x in all_a)


def test_partitioned_equals_replicated(world, shared_tmp, digits_h5):
    """Same sampler scope ('shard'): partitioned and replicated data train identically."""
    results = []
    for mode in ("partitioned", "replicated"):
        cfg = make_cfg(shared_tmp / mode, digits_h5, model={"name": "mlp", "hidden": [16]},
                       data={"mode": mode, "shuffle": "shard", "read_chunk": 100},
                       train={"batch_size": 7, "max_steps": 12, "epochs": 2})
        _, m = train(cfg, world, world.logger())
        results.append(flat_params(m))
    assert torch.equal(results[0], results[1])


def _toy_steps(world, step_fn, steps=5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48),
                                torch.nn.ReLU(), torch.nn.Linear(48, 5))
    broadcast_model(model, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + world.rank)
    state = step_fn(model, None)
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        step_fn(model, state, x, y)
        opt.step()
    if state is not None and hasattr(state, "close"):
        state.close()
    return flat_params(model)


def _flat_after_backward(model, state, x=None, y=None):
    if x is None:
        return None
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    buffers.allreduce_(MPI.COMM_WORLD, flat)
    flat /= MPI.COMM_WORLD.Get_size()
    off = 0
    for p in model.parameters():
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()


def _bucketed(overlap, bucket_bytes):
    def fn(model, state, x=None, y=None):
        if x is None:
            return GradBuckets(model.parameters(), MPI.COMM_WORLD, bucket_bytes=bucket_bytes,
                               first_bucket_bytes=min(bucket_bytes, 1024), overlap=overlap)
        state.zero_()
        F.cross_entropy(model(x), y).backward()
        state.finish()
    return fn


def test_bucketing_and_overlap_match_one_flat_allreduce(world):
    flat = _toy_steps(world, _flat_after_backward)
    for overlap in ("thread", "nonblocking", "none"):
        for bucket_bytes in (2048, 8192, 10**8):
            got = _toy_steps(world, _bucketed(overlap, bucket_bytes))
            # same sums; for more than 2 ranks MPI may associate differently by message size
            if world.size <= 2:
                assert torch.equal(got, flat), (overlap, bucket_bytes)
            else:
                torch.testing.assert_close(got, flat, rtol=1e-6, atol=1e-7)
    # a comm thread does not change the arithmetic: identical bits for a fixed bucket layout
    ref = _toy_steps(world, _bucketed("none", 4096))
    assert torch.equal(_toy_steps(world, _bucketed("thread", 4096)), ref)
    # Iallreduce (Open MPI's libnbc) may associate the sum differently beyond 2 ranks
    nb = _toy_steps(world, _bucketed("nonblocking", 4096))
    if world.size <= 2:
        assert torch.equal(nb, ref)
    else:
        torch.testing.assert_close(nb, ref, rtol=1e-6, atol=1e-7)


def test_grads_are_views_of_bucket_buffers(world):
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    bk = GradBuckets(model.parameters(), world.comm, bucket_bytes=200, first_bucket_bytes=100)
    try:
        ptrs = {b.data_ptr(): b for b in bk.flat}
        for p in model.parameters():
            base = p.grad._base
            assert base is not None and base.data_ptr() in ptrs
        assert len(bk.flat) > 1  # several buckets, reverse order
        assert bk.buckets[0][0] is list(model.parameters())[-1]
        # zero_grad(set_to_none=True) must not break the reduction: the hook restores the view
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(torch.ones(2, 10) * (world.rank + 1)), torch.tensor([0, 1])).backward()
        bk.finish()
        assert all(p.grad._base is not None for p in model.parameters())
    finally:
        bk.close()


def test_same_as_torch_ddp_gloo(world):
    import torch.distributed as dist
    from mpitrain.bench import _init_gloo

    ours = _toy_steps(world, _bucketed("thread", 4096))
    _init_gloo(world)
    try:
        def ddp_fn(model, ddp, x=None, y=None):
            if x is None:
                return torch.nn.parallel.DistributedDataParallel(model)
            for p in model.parameters():
                p.grad = None
            F.cross_entropy(ddp(x), y).backward()
        theirs = _toy_steps(world, ddp_fn)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
