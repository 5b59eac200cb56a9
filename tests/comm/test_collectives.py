"""Bucketed gradient allreduce: every bucket layout and overlap mode gives the sums of one
flat allreduce, gradients are views of the bucket buffers, and the result equals torch DDP."""

import pytest
import torch
import torch.nn.functional as F

from mpitrain.comm import buffers
from mpitrain.comm.collectives import GradBuckets, NodeHierarchy, resolve_overlap

pytestmark = pytest.mark.mpi


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _toy_steps(world, step_fn, steps=5, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48),
                                torch.nn.ReLU(), torch.nn.Linear(48, 5)).to(device)
    world.broadcast_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + world.rank)
    state = step_fn(model, None)
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        step_fn(model, state, x.to(device), y.to(device))
        opt.step()
    if state is not None and hasattr(state, "close"):
        state.close()
    return flat_params(model).cpu()


def _flat_after_backward(world):
    def fn(model, state, x=None, y=None):
        if x is None:
            return None
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        world.allreduce_(flat)
        flat /= world.size
        off = 0
        for p in model.parameters():
            p.grad.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
    return fn


def _bucketed(world, overlap, bucket_bytes, cuda_path="auto"):
    def fn(model, state, x=None, y=None):
        if x is None:
            return GradBuckets(model.parameters(), world, bucket_bytes=bucket_bytes,
                               first_bucket_bytes=min(bucket_bytes, 1024), overlap=overlap, cuda_path=cuda_path)
        state.zero_()
        F.cross_entropy(model(x), y).backward()
        state.finish()
    return fn


def test_bucketing_and_overlap_match_one_flat_allreduce(world):
    flat = _toy_steps(world, _flat_after_backward(world))
    for overlap in ("thread", "nonblocking", "none"):
        for bucket_bytes in (2048, 8192, 10**8):
            got = _toy_steps(world, _bucketed(world, overlap, bucket_bytes))
            # same sums; for more than 2 ranks MPI may associate differently by message size
            if world.size <= 2:
                assert torch.equal(got, flat), (overlap, bucket_bytes)
            else:
                torch.testing.assert_close(got, flat, rtol=1e-6, atol=1e-7)
    # a comm thread does not change the arithmetic: identical bits for a fixed bucket layout
    ref = _toy_steps(world, _bucketed(world, "none", 4096))
    assert torch.equal(_toy_steps(world, _bucketed(world, "thread", 4096)), ref)
    # Iallreduce (Open MPI's libnbc) may associate the sum differently beyond 2 ranks
    nb = _toy_steps(world, _bucketed(world, "nonblocking", 4096))
    if world.size <= 2:
        assert torch.equal(nb, ref)
    else:
        torch.testing.assert_close(nb, ref, rtol=1e-6, atol=1e-7)


def test_grads_are_views_of_bucket_buffers(world):
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    bk = GradBuckets(model.parameters(), world, bucket_bytes=200, first_bucket_bytes=100)
    try:
        ptrs = {b.data_ptr(): b for b in bk.buffers}
        for p in model.parameters():
            base = p.grad._base
            assert base is not None and base.data_ptr() in ptrs
        assert len(bk.buffers) > 1  # several buckets, reverse order
        assert bk.buckets[0][0] is list(model.parameters())[-1]
        # zero_grad(set_to_none=True) must not break the reduction: the hook restores the view
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(torch.ones(2, 10) * (world.rank + 1)), torch.tensor([0, 1])).backward()
        bk.finish()
        assert all(p.grad._base is not None for p in model.parameters())
    finally:
        bk.close()


def test_buckets_count_their_traffic(world):
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 3))
    bk = GradBuckets(model.parameters(), world, bucket_bytes=200, first_bucket_bytes=100, overlap="none")
    try:
        before = world.bytes_sent()
        for _ in range(2):
            bk.zero_()
            F.cross_entropy(model(torch.ones(2, 10)), torch.tensor([0, 1])).backward()
            bk.finish()
        assert world.bytes_sent() - before == 2 * bk.nbytes == 2 * 4 * sum(p.numel() for p in model.parameters())
    finally:
        bk.close()


def test_resolve_overlap():
    assert resolve_overlap("auto", 1, on_gpu=False) == "none"
    assert resolve_overlap("auto", 2, on_gpu=False) == "thread"
    assert resolve_overlap("auto", 1, on_gpu=True) == "thread"
    for mode in ("thread", "nonblocking", "none"):
        assert resolve_overlap(mode, 1, on_gpu=False) == mode
    # below MPI_THREAD_MULTIPLE: no comm thread; CUDA hooks (autograd's device thread) may not call MPI
    for mode in ("auto", "thread", "nonblocking"):
        assert resolve_overlap(mode, 4, on_gpu=False, thread_multiple=False) == "nonblocking"
        assert resolve_overlap(mode, 4, on_gpu=True, thread_multiple=False) == "none"
    assert resolve_overlap("none", 4, on_gpu=True, thread_multiple=False) == "none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overlap", ["thread", "nonblocking", "none"])
def test_half_precision_buckets_on_cpu(world, dtype, overlap):
    """fp16/bf16 gradients are summed in float32 (MPI has no fp16 type, mis-sums bf16)."""
    model = torch.nn.Linear(6, 4).to(dtype)
    bk = GradBuckets(model.parameters(), world, bucket_bytes=64, first_bucket_bytes=32, overlap=overlap)
    try:
        for step in range(2):
            bk.zero_()
            (model.weight.sum() * (world.rank + 1) + model.bias.sum() * 0.5).backward()
            bk.finish()
            n = world.size
            assert torch.equal(model.weight.grad, torch.full((4, 6), (n + 1) / 2, dtype=dtype))  # mean of 1..n
            assert torch.equal(model.bias.grad, torch.full((4,), 0.5, dtype=dtype)), step
    finally:
        bk.close()


def test_same_as_torch_ddp_gloo(world):
    import torch.distributed as dist
    from mpitrain.bench.timing import init_gloo

    ours = _toy_steps(world, _bucketed(world, "thread", 4096))
    init_gloo(world)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overlap", ["thread", "nonblocking", "none"])
@pytest.mark.parametrize("cuda_path", ["staged", "direct", "auto"])
def test_cuda_buckets_match_the_cpu_result(world, overlap, cuda_path):
    """Staged or direct, from the comm thread or after backward: the sums of the CPU path
    (up to the GPU's own float rounding in forward/backward)."""
    cpu = _toy_steps(world, _bucketed(world, "none", 4096))
    got = _toy_steps(world, _bucketed(world, overlap, 4096, cuda_path), device="cuda")
    torch.testing.assert_close(got, cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["halves", "one node", "a rank per node", "uneven"])
def test_hierarchical_allreduce_equals_flat(world, layout):
    """Sum in the node, over the node leaders, broadcast in the node: the flat sum, for
    any grouping of ranks into nodes (integer-valued floats: exact in any order)."""
    n, r = world.size, world.rank
    color = {"halves": r // max(1, n // 2), "one node": 0, "a rank per node": r,
             "uneven": 0 if r == 0 else 1}[layout]
    h = NodeHierarchy(world.comm, color=color)
    try:
        expect_nodes = len({(i // max(1, n // 2)) if layout == "halves" else
                            {"one node": 0, "a rank per node": i, "uneven": min(i, 1)}[layout] for i in range(n)})
        assert h.nodes == expect_nodes
        for dtype in (torch.float32, torch.float64):
            t = torch.arange(1000, dtype=dtype) * (r + 1) - r
            buffers.allreduce_(world.comm, t, via=h)
            s1 = n * (n + 1) // 2
            assert torch.equal(t, torch.arange(1000, dtype=dtype) * s1 - n * (n - 1) // 2)
    finally:
        h.free()


def test_hierarchical_buckets_match_flat(world):
    flat = _toy_steps(world, _bucketed(world, "none", 4096))

    def hier(model, state, x=None, y=None):
        if x is None:
            return GradBuckets(model.parameters(), world, bucket_bytes=4096, first_bucket_bytes=1024,
                               overlap="thread", hierarchical=True)
        state.zero_()
        F.cross_entropy(model(x), y).backward()
        state.finish()
    torch.testing.assert_close(_toy_steps(world, hier), flat, rtol=1e-6, atol=1e-7)


def test_hierarchical_option_values(world):
    from mpitrain.errors import UserError
    from mpitrain.options import build
    from mpitrain.sync.allreduce import Options

    for ok in (True, False, "auto"):
        assert build(Options, {"hierarchical": ok}, "t", "sync.allreduce").hierarchical == ok
    for bad, message in ((1, "true or false or a string"), ("yes", "one of True, False, 'auto'")):
        with pytest.raises(UserError, match=message):
            build(Options, {"hierarchical": bad}, "t", "sync.allreduce")
