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
        # Debian's Open MPI is not CUDA-aware; the query must say so without crashing
        assert buffers.cuda_aware() in (True, False)
    finally:
        buffers.cuda_aware.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_never_reaches_non_cuda_aware_mpi(world, monkeypatch):
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "0")
    buffers.cuda_aware.cache_clear()
    t = torch.full((1000,), float(world.rank + 1), device="cuda")
    buffers.allreduce_(world.comm, t)  # staged through pinned host memory
    assert torch.all(t.cpu() == world.size * (world.size + 1) / 2)
    buffers.cuda_aware.cache_clear()
