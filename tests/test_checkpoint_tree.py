"""The one checkpoint path: format-1 files still resume, the Python API's checkpoints and
the command line's are the same file (each resumes under the other), and the API's step
is the job runner's step (accumulation, clipping) with its misuse named in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mpitrain
from mpitrain import checkpoint
from mpitrain.errors import UserError
from mpitrain.models import mlp
from mpitrain.train import train

pytestmark = pytest.mark.mpi
FIXTURES = Path(__file__).parent / "fixtures"


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _job(make_cfg, run, digits_h5, strategy="allreduce", options=None, clip_norm=0.0, **train_kw):
    return make_cfg(run, digits_h5, model={"name": "mlp", "hidden": [16]},
                    data={"mode": "replicated", "shuffle": "global"},
                    optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant", "clip_norm": clip_norm},
                    sync={"strategy": strategy, strategy: options or {}},
                    train={"batch_size": 8, "max_steps": 10, "resume": "auto", **train_kw},
                    output={"checkpoint_every": 0})


@pytest.mark.parametrize("name, strategy, options, ranks", [
    ("allreduce", "allreduce", {}, 1), ("local_sgd", "local_sgd", {"period": 3}, 2),
    ("allreduce-topk", "allreduce", {"compress": {"kind": "topk", "ratio": 0.1}}, 2)])
def test_format_1_checkpoints_still_resume(world, shared_tmp, digits_h5, make_cfg, name, strategy, options, ranks):
    """A checkpoint written by 69910c2 (format 1) resumes: at the world size it was written
    at, every rank's parameters at step 8 equal what 69910c2 itself computed (its
    compression residuals are not mapped: topk restarts them at zero, so it only trains on)."""
    cfg = make_cfg(shared_tmp / name, digits_h5, model={"name": "mlp", "hidden": [16]},
                   optim={"name": "sgd", "lr": 0.05, "momentum": 0.9}, sync={"strategy": strategy, strategy: options},
                   train={"batch_size": 8, "max_steps": 8, "resume": str(FIXTURES / f"v1-{name}.h5")},
                   output={"checkpoint_every": 0})
    row, model = train(cfg, world, world.logger())
    assert row["step"] == 8 and torch.isfinite(params(model)).all()
    if world.size == ranks and "topk" not in name:
        want = np.load(FIXTURES / f"v1-{name}-step8.npy", allow_pickle=False)[world.rank]
        assert np.array_equal(params(model).numpy(), want), name


def _user_loop(world, digits_h5, steps, strategy="allreduce", *, batches=None, accumulate=1, **kw):
    data = mpitrain.Loader(digits_h5, world, 8, split="train", mode="replicated", seed=0)
    torch.manual_seed(0)
    model = mlp((8, 8), 10, hidden=(16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = mpitrain.distribute(model, opt, strategy=strategy, world=world, accumulate=accumulate, **kw)
    batches = batches or data.epoch(0)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = next(batches)
            opt.backward(F.cross_entropy(model(x), y))
        opt.step()
    return model, opt, batches


def _same_components(a: dict, b: dict, exact: bool):
    """model, optim, strategy, precision of two checkpoint trees (not meta, position, rng)."""
    for part in ("model", "strategy", "precision"):
        assert set(a[part]) == set(b[part]), part
        for k in a[part]:
            if exact:
                assert np.array_equal(a[part][k], b[part][k]), (part, k)
            else:
                np.testing.assert_allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(a["optim"]["param_groups"], b["optim"]["param_groups"]):  # hyperparameters are each
        assert (ga["lr"], ga["momentum"], ga["params"]) == (gb["lr"], gb["momentum"], gb["params"])  # optimizer's own
    for i, entries in a["optim"]["state"].items():
        for k, v in entries.items():
            assert (np.array_equal if exact else np.allclose)(v, b["optim"]["state"][i][k]), (i, k)


def test_api_and_job_runner_write_the_same_checkpoint(world, shared_tmp, digits_h5, make_cfg):
    """6 steps of a user loop and of `mpitrain train`: the two checkpoints hold the same
    components (bit for bit where the world size is a power of two: the loss weights are
    then exact), and each resumes under the other to equal an uninterrupted 10-step run."""
    _, ref = train(_job(make_cfg, shared_tmp / "ref", digits_h5), world, world.logger())
    train(_job(make_cfg, shared_tmp / "cli", digits_h5, max_steps=6), world, world.logger())
    model, opt, batches = _user_loop(world, digits_h5, 6)
    api_path = shared_tmp / "api" / "ckpt-000000006.h5"
    if world.is_root:
        api_path.parent.mkdir()
    world.barrier()
    mpitrain.save(str(api_path), model, opt, samples_in_epoch=6 * 8 * world.size)

    def compare():
        a, b = checkpoint.read(api_path), checkpoint.read(checkpoint.path_for(shared_tmp / "cli", 6))
        try:
            _same_components(a, b, exact=world.size & (world.size - 1) == 0)
            assert a["meta"]["model"] == "" and b["meta"]["model"] == "mpitrain.models:mlp"
        except AssertionError as e:
            return repr(e)
    differ = world.bcast(compare() if world.is_root else None)  # every rank asserts alike
    assert differ is None, differ
    # the command line's checkpoint resumes in the user's loop ...
    assert mpitrain.restore(str(checkpoint.path_for(shared_tmp / "cli", 6)), model, opt) == 6
    for _ in range(4):
        opt.zero_grad()
        x, y = next(batches)
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)
    opt.close()
    # ... and the user's loop's under the command line
    _, got = train(_job(make_cfg, shared_tmp / "api", digits_h5), world, world.logger())
    torch.testing.assert_close(params(got), params(ref), rtol=1e-5, atol=1e-6)


def test_api_accumulation_and_clipping_are_the_job_runners(world, shared_tmp, digits_h5, make_cfg):
    model, opt, _ = _user_loop(world, digits_h5, 5, accumulate=2, clip_norm=0.5)
    opt.close()
    _, ref = train(_job(make_cfg, shared_tmp / "acc", digits_h5, clip_norm=0.5, max_steps=5, accumulate=2), world,
                   world.logger())
    torch.testing.assert_close(params(model), params(ref), rtol=1e-5, atol=1e-6)


def test_loader_bad_values_are_one_line(world, digits_h5):
    for kw, match in (({"batch_size": 0}, "train.batch_size: expected a value > 0"),
                      ({"batch_size": 8, "mode": "sharded"}, "data.mode: expected one of"),
                      ({"batch_size": 8, "seed": -1}, "train.seed: expected a value >= 0")):
        with pytest.raises(UserError, match=match) as e:
            mpitrain.Loader(digits_h5, world, **kw)
        assert "\n" not in str(e.value)


def test_checkpoint_names_past_a_billion_steps(tmp_path):
    for step in (999_999_999, 1_000_000_000, 7):
        checkpoint.path_for(tmp_path, step).write_bytes(b"")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-1000000000.h5", "ckpt-999999999.h5", "ckpt-000000007.h5"]


def test_the_optimizer_is_the_users_class(world):
    model = mlp((8, 8), 10, hidden=(4,))
    model, opt = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), world=world)
    assert isinstance(opt, torch.optim.SGD) and isinstance(opt, mpitrain.DistributedOptimizer)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # takes it directly
    x, y = torch.randn(4, 8, 8), torch.arange(4)
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y))
    opt.step()
    schedule.step()
    assert opt.param_groups[0]["lr"] == 0.05 and opt.steps == 1
    sd = opt.state_dict()
    assert sd["state"] and json.dumps(sd["param_groups"])
    opt.load_state_dict(sd)
    opt.close()


def test_api_misuse_is_one_line(world):
    model = mlp((8, 8), 10, hidden=(4,))
    model, opt = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world, accumulate=2)
    x, y = torch.randn(4, 8, 8), torch.arange(4)
    cases = []

    def expect(fn, match):
        with pytest.raises(UserError, match=match) as e:
            fn()
        cases.append(str(e.value))
    expect(opt.step, "step\\(\\) after 0 of accumulate=2 .*not loss.backward")
    opt.backward(F.cross_entropy(model(x), y))
    expect(opt.step, "step\\(\\) after 1 of accumulate=2")
    expect(opt.zero_grad, "zero_grad\\(\\) after 1 optimizer.backward")
    opt.backward(F.cross_entropy(model(x), y))
    expect(lambda: opt.backward(F.cross_entropy(model(x), y)), "called 3 times before optimizer.step")
    opt.step()
    expect(lambda: opt.step(lambda: 0.0), "closures are not supported")
    expect(lambda: mpitrain.distribute(model, opt, world=world), "optimizer is distributed already")
    expect(lambda: mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world),
           "model is distributed already")
    expect(lambda: mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world,
                                       precision="fp8"), "train.precision: expected one of")
    expect(lambda: mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world,
                                       precision="fp16"), "fp16' needs a model on a GPU")
    expect(lambda: mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world,
                                       clip_norm=-1.0), "optim.clip_norm: expected a value >= 0")
    expect(lambda: mpitrain.save("x.h5", mlp((8, 8), 10, hidden=(4,)), opt), "not the one distributed")
    opt.close()
    opt.close()  # twice is fine
    expect(opt.zero_grad, "after optimizer.close")
    expect(lambda: opt.backward(F.cross_entropy(model(x), y)), "after optimizer.close")
    expect(opt.step, "after optimizer.close")
    assert all("\n" not in m for m in cases), cases
    _, again = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), world=world)  # after close
    again.close()
