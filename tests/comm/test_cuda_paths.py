"""CUDA transfers: the comm thread never waits for the training thread's stream, and
allgather/alltoall keep to the agreed path (device buffers, or pinned host stagers)."""

import pytest
import torch

from mpitrain.comm import buffers
from mpitrain.comm.collectives import GradBuckets

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def agreed(world, ok: bool, what: str) -> None:
    """Assert on every rank at once: a rank that fails alone would leave the others waiting."""
    failed = [r for r, good in enumerate(world.comm.allgather(bool(ok))) if not good]
    assert not failed, f"{what} (rank(s) {failed})"


def _busy(seconds: float) -> None:
    """Queue a few seconds of GPU work on the current stream (returns at once)."""
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(seconds * 2e9))  # clock cycles: about `seconds` at ~2 GHz
    else:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(int(seconds * 200)):
            a = a @ a / a.norm()


def test_comm_thread_does_not_wait_for_the_default_stream(world):
    """Staged bucket reductions on the comm thread wait for their bucket's event only: they
    finish while the training thread's stream still runs kernels queued after backward."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    bk = GradBuckets(model.parameters(), world, bucket_bytes=1 << 20, first_bucket_bytes=1 << 10,
                     overlap="thread", cuda_path="staged")
    try:
        for step in range(2):
            bk.zero_()
            model(torch.ones(8, 256, device="cuda")).sum().backward()  # the hooks hand the buckets over
            _busy(3.0)  # later work of the training thread
            done = [bk._done.get(timeout=120) for _ in bk.buckets]
            busy = not torch.cuda.current_stream().query()
            for d in done:  # back for finish
                bk._done.put(d)
            bk.finish()
            agreed(world, busy, f"step {step}: the comm thread waited for the training thread's stream")
            agreed(world, torch.equal(model.bias.grad.cpu(), torch.full((256,), 8.0)), "the gradient")
    finally:
        bk.close()


@pytest.mark.parametrize("direct", [False, True])
def test_allgather_alltoall_keep_to_the_agreed_path(world, monkeypatch, direct):
    """Staged: through pinned stagers (no pageable .cpu() copies); direct: device buffers."""
    if direct and world.min(int(buffers.cuda_aware())) == 0:  # agreed: every rank skips alike
        pytest.skip("the direct path needs a CUDA-aware MPI on every rank (MPITRAIN_CUDA_AWARE=1)")
    used = []
    real = buffers.stager_for

    def spy(t, slot=0):
        used.append(real(t, slot))
        return used[-1]
    monkeypatch.setattr(buffers, "stager_for", spy)
    real_cpu, pageable = torch.Tensor.cpu, []

    def cpu(self, *args, **kwargs):
        pageable.append(self.shape)
        return real_cpu(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    n = world.size
    t = torch.arange(10, device="cuda", dtype=torch.float16) + world.rank
    got = buffers.allgather(world.comm, t, direct=direct)
    rows = torch.stack([torch.arange(6, device="cuda", dtype=torch.float32) + 100 * world.rank + j
                        for j in range(n)])
    a2a = buffers.alltoall(world.comm, rows, direct=direct)
    torch.cuda.synchronize()
    monkeypatch.undo()
    expect_ag = torch.stack([torch.arange(10, dtype=torch.float16) + r for r in range(n)])
    expect_a2a = torch.stack([torch.arange(6, dtype=torch.float32) + 100 * i + world.rank for i in range(n)])
    ok = (got.is_cuda and a2a.is_cuda and torch.equal(got.cpu(), expect_ag) and torch.equal(a2a.cpu(), expect_a2a))
    agreed(world, ok, "values")
    path_ok = not pageable and ((not used) if direct else (len(used) == 4 and all(st.host.is_pinned() for st in used)))
    agreed(world, path_ok, f"{len(used)} stagers used on the {'direct' if direct else 'staged'} path")


def test_bcast_cuda_staged_beyond_one_piece(world, monkeypatch):
    """Staged broadcast of a CUDA tensor in pieces (forced limit), non-root ranks receiving
    straight into the stager."""
    from mpitrain.comm import counts

    monkeypatch.setattr(counts, "MAX_COUNT", 7)
    t = torch.arange(100, device="cuda", dtype=torch.float64) * (world.rank + 1)
    buffers.bcast_(world.comm, t, direct=False)
    t.mul_(2)  # queued after the copy back
    agreed(world, torch.equal(t.cpu(), torch.arange(100, dtype=torch.float64) * 2), "bcast_ cuda")
