"""On a GPU (skipped without one): each rank on its own GPU and the agreed CUDA path (the
`world` fixture, the Python API), sign's bits packed on the device, token batches uploaded
from pinned memory, and a trace that says its spans are launch times."""

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_the_fixture_selects_this_ranks_gpu_and_the_agreed_path(world):
    from mpitrain.comm import buffers

    assert torch.cuda.current_device() == world.local_rank % torch.cuda.device_count()
    assert world.direct_cuda is (world.min(int(buffers.cuda_aware())) == 1)
    if os.environ.get("MPITRAIN_CUDA_AWARE") == "1":
        assert world.direct_cuda is True  # the direct path is reachable from the tests


def test_api_model_on_this_ranks_gpu(world):
    import torch.nn.functional as F

    import mpitrain
    from mpitrain.comm import buffers
    from mpitrain.models import mlp

    torch.manual_seed(0)
    model = mlp((8, 8), 10, hidden=(16,)).to("cuda")
    assert next(model.parameters()).device == torch.device("cuda", world.local_rank % torch.cuda.device_count())
    model, opt = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world)
    try:
        x = torch.randn(4, 64, device="cuda")
        y = torch.randint(0, 10, (4,), device="cuda")
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        every = world.allgather_tensor(flat)
        assert all(torch.equal(every[0], r) for r in every)  # one model on every rank
        assert world.min(int(buffers.cuda_aware())) == 1 or world.direct_cuda is False
    finally:
        opt.close()


def test_sign_bits_on_the_gpu(world):
    from mpitrain.options import build
    from mpitrain.sync.compress import REGISTRY
    from mpitrain.sync.compress.sign import pack_bits, unpack_bits

    flags = torch.rand(1001, generator=torch.Generator().manual_seed(1)) < 0.5
    packed = pack_bits(flags.cuda())
    assert packed.is_cuda and np.array_equal(packed.cpu().numpy(), np.packbits(flags.numpy()))
    assert torch.equal(unpack_bits(packed, 1001).cpu().bool(), flags)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(world.rank))
    cls = REGISTRY["sign"]
    opts = build(cls.Options, {}, "<test>", "x")
    cpu, gpu = g.clone(), g.cuda()
    cls(opts, cpu, [(0, cpu.shape)], world).reduce_(cpu, 0)
    cls(opts, gpu, [(0, gpu.shape)], world).reduce_(gpu, 0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)  # the mean |value| may round apart


def test_token_batches_upload_from_pinned_memory(monkeypatch):
    from mpitrain.data import loader
    from mpitrain.data.hdf5 import TokenSplit

    made = []
    real = loader.pinned
    monkeypatch.setattr(loader, "pinned", lambda a, pin=True: made.append(real(a, pin)) or made[-1])
    x, y = loader.to_device(TokenSplit(np.arange(100, dtype=np.int64), 0, 24, 4).take(np.array([2, 5])),
                            torch.device("cuda"))
    assert len(made) == 2 and all(t.is_pinned() and t.is_contiguous() for t in made)
    assert torch.equal(x[:, 1:].cpu(), y[:, :-1].cpu())


def test_trace_says_its_spans_are_launch_times(world):
    from mpitrain import trace

    torch.zeros(1, device="cuda")  # CUDA initialised in this process
    assert trace.Tracer.clock() == "launch"
    assert trace.hidden_fraction(trace.merge([[]], trace.Tracer.clock())) is None
