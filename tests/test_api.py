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
