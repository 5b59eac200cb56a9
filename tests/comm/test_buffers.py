"""Tensor <-> MPI buffers: dtype allow-list and exact reductions on known values."""

import pytest
import torch

from mpitrain.comm import buffers

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.int32, torch.int64])
def test_allreduce_exact_on_known_values(world, dtype):
    n = world.size
    # rank r contributes (r + 1) * base; every partial sum is exactly representable in bf16
    base = torch.tensor([1.0, 0.5, -2.0, 0.25, 3.0, 0.0, -0.75, 1.5] * 3)
    if not dtype.is_floating_point:
        base = torch.tensor([1, 2, -3, 7, 0, 5] * 4)
    t = (base * (world.rank + 1)).to(dtype)
    buffers.allreduce_(world.comm, t)
    expect = (base * (n * (n + 1) // 2)).to(dtype)
    assert t.dtype == dtype
    assert torch.equal(t, expect), (t, expect)


def test_fp16_bf16_have_no_direct_mpi_type():
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="reduced in float32"):
            buffers.mpi_dtype(torch.zeros(1, dtype=dt))


def test_bcast_from_root(world):
    t = torch.arange(10, dtype=torch.float64) * (world.rank + 1)
    buffers.bcast_(world.comm, t)
    assert torch.equal(t, torch.arange(10, dtype=torch.float64))


def test_cuda_aware_env_override(monkeypatch):
    buffers.cuda_aware.cache_clear()
    try:
        monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "1")
        assert buffers.cuda_aware() is True
        buffers.cuda_aware.cache_clear()
        monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "0")
        assert buffers.cuda_aware() is False
        buffers.cuda_aware.cache_clear()
        monkeypatch.delenv("MPITRAIN_CUDA_AWARE")
        # Open MPI 4.x only says how it was built (ompi#7963): never trusted without the variable
        from mpi4py import MPI

        version = MPI.Get_library_version()
        if version.startswith("Open MPI v4") or version.startswith("Open MPI v3"):
            assert buffers.cuda_aware() is False
        assert buffers._libmpi() is not None  # the libmpi mpi4py loaded, found among mapped objects
    finally:
        buffers.cuda_aware.cache_clear()


def test_device_and_cuda_path_are_agreed(world, monkeypatch):
    """One rank claiming a CUDA-aware MPI (the variable set there only) must not send the
    others into a direct-path probe: the job agrees (all or nothing), before any probe."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "1" if world.rank == 0 else "0")
    buffers.cuda_aware.cache_clear()
    try:
        assert world.select_device("cuda") == torch.device("cuda", 0) and world.direct_cuda is (world.size == 1)
        monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "1")
        buffers.cuda_aware.cache_clear()
        world.select_device("auto")
        assert world.direct_cuda is True
        # a GPU on some ranks only: "auto" is the CPU everywhere, "cuda" one agreed error
        monkeypatch.setattr(torch.cuda, "is_available", lambda: world.rank != world.size - 1)
        assert world.select_device("auto") == torch.device("cpu") and world.direct_cuda is False
        from mpitrain.errors import AgreedError

        with pytest.raises(AgreedError, match=f"no CUDA device on rank\\(s\\) {world.size - 1}"):
            world.select_device("cuda")
    finally:
        buffers.cuda_aware.cache_clear()
        world.direct_cuda = False


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_tensor_never_reaches_non_cuda_aware_mpi(world):
    t = torch.full((1000,), float(world.rank + 1), device="cuda")
    buffers.allreduce_(world.comm, t, direct=False)  # staged through pinned host memory
    assert torch.all(t.cpu() == world.size * (world.size + 1) / 2)


@cuda
@pytest.mark.parametrize("direct", [False, True])
def test_staged_copies_wait_for_the_producing_kernels(world, direct):
    """The copy to the host must come after the kernels still queued on the current stream
    (a side stream does not wait by itself), and later kernels must see the copy back."""
    if direct and world.min(int(buffers.cuda_aware())) == 0:  # agreed: every rank skips alike
        pytest.skip("the direct path needs a CUDA-aware MPI on every rank (MPITRAIN_CUDA_AWARE=1)")
    n = 1 << 24
    t = torch.zeros(n, device="cuda")
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # keep the stream busy, then write the values
        a = a @ a / a.norm()
    t.fill_(world.rank + 1).add_(a[0, 0] * 0)
    buffers.allreduce_(world.comm, t, direct=direct)
    t.mul_(2)  # queued after the copy back
    assert torch.all(t == world.size * (world.size + 1)).item()


@cuda
def test_bcast_cuda(world):
    t = torch.arange(1000, device="cuda", dtype=torch.float32) * (world.rank + 1)
    buffers.bcast_(world.comm, t, direct=world.direct_cuda)
    assert torch.equal(t.cpu(), torch.arange(1000, dtype=torch.float32))
