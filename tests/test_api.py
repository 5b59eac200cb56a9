"""The Python API (mpitrain.init / distribute / Loader / save / restore): a user's own loop."""

import pytest
import torch
import torch.nn.functional as F

import mpitrain
from mpitrain.errors import UserError
from mpitrain.models import mlp
from mpitrain.train import train

pytestmark = pytest.mark.mpi


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _user_loop(world, digits_h5, strategy, steps=6, **options):
    data = mpitrain.Loader(digits_h5, world, 8, split="train", mode="replicated", seed=0)
    torch.manual_seed(0)
    model = mlp((8, 8), 10, hidden=(16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = mpitrain.distribute(model, opt, strategy=strategy, world=world, **options)
    batches = data.epoch(0)
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))  # this rank's mean, as with DDP
        opt.step()
    return model, opt


@pytest.mark.parametrize("strategy, options", [("allreduce", {}), ("ps_sync", {}), ("local_sgd", {"period": 2})])
def test_a_user_loop_equals_the_job_runner(world, shared_tmp, digits_h5, make_cfg, strategy, options):
    """Same model, data order, optimizer and steps: the API's loop (local means, divided by
    N on the way for strategies that sum) and `mpitrain train` agree."""
    model, opt = _user_loop(world, digits_h5, strategy, **options)
    opt.close()
    cfg = make_cfg(shared_tmp / "job", digits_h5, model={"name": "mlp", "hidden": [16]},
                   data={"mode": "replicated", "shuffle": "global"},
                   optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
                   sync={"strategy": strategy, strategy: options}, train={"batch_size": 8, "max_steps": 6})
    _, ref = train(cfg, world, world.logger())
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)


def test_save_and_restore_at_any_world_size(world, shared_tmp, digits_h5):
    model, opt = _user_loop(world, digits_h5, "bmuf", period=3)
    path = shared_tmp / "api.h5"
    mpitrain.save(str(path), model, opt, step=opt.steps)
    with opt.consolidated():
        saved = params(model).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert mpitrain.restore(str(path), model, opt) == 6
    with opt.consolidated():
        assert torch.equal(params(model), saved)
    opt.close()


def test_bad_strategy_and_options(world):
    model = mlp((8, 8), 10, hidden=(4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="unknown strategy 'gossip'"):
        mpitrain.distribute(model, opt, strategy="gossip", world=world)
    with pytest.raises(UserError, match="unknown key sync.local_sgd.perod"):
        mpitrain.distribute(model, opt, strategy="local_sgd", world=world, perod=3)
    with pytest.raises(UserError, match="sync.bmuf.period: expected a value > 0"):
        mpitrain.distribute(model, opt, strategy="bmuf", world=world, period=0)


def test_distribute_selects_the_device_and_cuda_path(world, monkeypatch):
    """distribute() selects the model's kind of device on every rank (World.select_device:
    this rank's GPU, the agreed CUDA path), as `mpitrain train` does; on CPUs nothing else."""
    from mpitrain.comm import World

    seen = []
    real = World.select_device
    monkeypatch.setattr(World, "select_device", lambda self, want: seen.append(want) or real(self, want))
    model = mlp((8, 8), 10, hidden=(4,))
    model, opt = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world)
    opt.close()
    assert seen == ["cpu"] and world.direct_cuda is False


def test_a_model_on_the_wrong_device_is_one_agreed_line(world, monkeypatch):
    from mpitrain import api
    from mpitrain.comm import World
    from mpitrain.errors import AgreedError

    monkeypatch.setattr(World, "select_device", lambda self, want: torch.device(want, 0) if want == "cuda"
                        else torch.device("cpu"))
    last = world.size - 1
    with pytest.raises(AgreedError, match=f"model is on cuda:1 but this rank's GPU is cuda:0.*" +
                       (f"\\(rank {last}\\)" if world.size > 1 else "")):
        api._select_device(world, torch.device("cuda", 1 if world.rank == last else 0))
    if world.size > 1:
        with pytest.raises(AgreedError, match="one kind of device on every rank \\(rank 0: cuda, rank 1: cpu"):
            api._select_device(world, torch.device("cuda", 0) if world.rank == 0 else torch.device("cpu"))
    with pytest.raises(UserError, match="init\\(device='gpu'\\): expected one of auto, cuda, cpu"):
        mpitrain.init(device="gpu")


def test_loader_cuda_is_this_ranks_gpu(world, digits_h5, monkeypatch):
    from mpitrain.errors import AgreedError

    if not torch.cuda.is_available():
        with pytest.raises(AgreedError, match="device = 'cuda' but torch sees no CUDA device"):
            mpitrain.Loader(digits_h5, world, 8, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert mpitrain.Loader(digits_h5, world, 8, device="cuda").device == torch.device("cuda", world.local_rank % 2)
    assert mpitrain.Loader(digits_h5, world, 8, device="cuda:1").device == torch.device("cuda", 1)
    assert mpitrain.Loader(digits_h5, world, 8).device == torch.device("cpu")


def test_token_batches_are_contiguous_before_pinning():
    """A token batch's inputs and targets are shifted views of one window array; the host
    copy the GPU upload starts from must be contiguous, or the copy goes through pageable
    memory again (and is synchronous)."""
    import numpy as np

    from mpitrain.data.hdf5 import TokenSplit
    from mpitrain.data.loader import pinned

    split = TokenSplit(np.arange(100, dtype=np.int64), 0, 24, 4)
    for a in split.take(np.array([3, 0, 7])):
        assert not a.flags.c_contiguous  # what take gives
        t = pinned(a, pin=False)
        assert t.is_contiguous() and np.array_equal(t.numpy(), a)
