"""Resume semantics: a run stopped at a random step and resumed equals the uninterrupted
run, bit for bit, for every deterministic strategy (ssp and async depend on timing); the
checkpoint supplies state, the job file the hyperparameters; metrics rows are not repeated."""

import json
import random
import signal

import numpy as np
import pytest
import torch

import mpitrain.train
from mpitrain.faults import Stopped, stop_flag
from mpitrain.train import train

pytestmark = pytest.mark.mpi
DETERMINISTIC = ["allreduce", "ps_sync", "local_sgd", "post_local_sgd", "bmuf", "easgd"]
OPTIONS = {"post_local_sgd": {"local_start": 6}, "bmuf": {"period": 3}, "easgd": {"period": 3},
           "local_sgd": {"period": 3}}


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _cfg(make_cfg, run, digits_h5, strategy, **train_kw):
    return make_cfg(run, digits_h5, sync={"strategy": strategy, strategy: OPTIONS.get(strategy, {})},
                    model={"name": "mlp", "hidden": [24]}, data={"mode": "replicated"},
                    optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
                    train={"batch_size": 8, "epochs": 3, "max_steps": 40, "resume": "auto", **train_kw},
                    output={"checkpoint_every": 0})


def _stop_at(monkeypatch, world, step):
    """Rank 0 gets SIGUSR1 (as from Slurm) during step `step`: every rank checkpoints after
    it and stops."""
    calls = {"n": 0}

    def fake_straggler(world_, cfg_train, t_compute):
        calls["n"] += 1
        if calls["n"] == step and world.is_root:
            stop_flag().signum = signal.SIGUSR1
    monkeypatch.setattr(mpitrain.train, "inject_straggler", fake_straggler)


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_stop_at_a_random_step_and_resume_is_exact(world, shared_tmp, digits_h5, make_cfg, monkeypatch, strategy):
    steps_per_epoch = -(-1438 // (8 * world.size))
    stop = random.Random(f"{strategy}-{world.size}").randrange(2, min(40, 3 * steps_per_epoch) - 1)
    _, ref = train(_cfg(make_cfg, shared_tmp / "ref", digits_h5, strategy), world, world.logger())
    _stop_at(monkeypatch, world, stop)
    with pytest.raises(Stopped, match=f"after step {stop}"):
        train(_cfg(make_cfg, shared_tmp / "run", digits_h5, strategy), world, world.logger())
    stop_flag().signum = 0
    monkeypatch.undo()
    row, got = train(_cfg(make_cfg, shared_tmp / "run", digits_h5, strategy), world, world.logger())
    if strategy == "ps_sync" and world.size > 2:  # >2 accumulates into the store associate freely
        torch.testing.assert_close(params(got), params(ref), rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(params(got), params(ref)), (strategy, stop)
    if world.is_root:  # one row per epoch, none repeated
        rows = [json.loads(ln) for ln in (shared_tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        ref_rows = [json.loads(ln) for ln in (shared_tmp / "ref" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
        assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]


def test_hyperparameters_come_from_the_job_file(world, shared_tmp, digits_h5, make_cfg):
    run = shared_tmp / "hp"
    cfg = _cfg(make_cfg, run, digits_h5, "allreduce", max_steps=5)
    train(cfg, world, world.logger())
    more = make_cfg(run, digits_h5, model={"name": "mlp", "hidden": [24]}, data={"mode": "replicated"},
                    optim={"name": "sgd", "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0},
                    train={"batch_size": 8, "epochs": 3, "max_steps": 6, "resume": "auto"})
    seen = {}
    orig = mpitrain.train.loop

    def spy(job, *a, **kw):
        seen.update(job.optimizer.param_groups[0])
        return orig(job, *a, **kw)
    mp = pytest.MonkeyPatch()
    mp.setattr(mpitrain.train, "loop", spy)
    try:
        train(more, world, world.logger())
    finally:
        mp.undo()
    assert seen["momentum"] == 0.5 and seen["weight_decay"] == 0.0
    assert np.isclose(seen["initial_lr"], 0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dropout_resumes_exactly(world, shared_tmp, digits_h5, make_cfg, monkeypatch):
    """Dropout draws from the CUDA generator on a GPU: its state is saved per rank too."""
    def cfg(run):
        return make_cfg(run, digits_h5, model={"name": "mlp", "hidden": [24], "dropout": 0.3},
                        data={"mode": "replicated"}, optim={"name": "sgd", "lr": 0.05},
                        train={"batch_size": 8, "epochs": 2, "max_steps": 30, "resume": "auto", "device": "cuda"},
                        output={"checkpoint_every": 0})
    _, ref = train(cfg(shared_tmp / "ref"), world, world.logger())
    _stop_at(monkeypatch, world, 11)
    with pytest.raises(Stopped):
        train(cfg(shared_tmp / "run"), world, world.logger())
    stop_flag().signum = 0
    monkeypatch.undo()
    _, got = train(cfg(shared_tmp / "run"), world, world.logger())
    assert torch.equal(params(got).cpu(), params(ref).cpu())
