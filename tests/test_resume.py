"""Resume semantics: a run stopped at a random step and resumed equals the uninterrupted
run, bit for bit, for every deterministic strategy (ssp and async depend on timing) and
every stateful gradient compressor; the checkpoint supplies state, the job file the
hyperparameters; metrics rows are not repeated."""

import json
import logging
import random
import signal

import numpy as np
import pytest
import torch

import mpitrain.train
from mpitrain import checkpoint, state
from mpitrain.faults import Stopped, stop_flag
from mpitrain.step import Step
from mpitrain.train import train

pytestmark = pytest.mark.mpi
DETERMINISTIC = ["allreduce", "ps_sync", "local_sgd", "post_local_sgd", "bmuf", "easgd"]
OPTIONS = {"post_local_sgd": {"local_start": 6}, "bmuf": {"period": 3}, "easgd": {"period": 3},
           "local_sgd": {"period": 3}}
COMPRESS = {"topk": {"compress": {"kind": "topk", "ratio": 0.1}}, "sign": {"compress": {"kind": "sign"}},
            "powersgd": {"compress": {"kind": "powersgd", "rank": 2, "min_numel": 0}}}


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _cfg(make_cfg, run, digits_h5, strategy, options=None, **train_kw):
    options = OPTIONS.get(strategy, {}) if options is None else options
    return make_cfg(run, digits_h5, sync={"strategy": strategy, strategy: options},
                    model={"name": "mlp", "hidden": [24]}, data={"mode": "replicated"},
                    optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
                    train={"batch_size": 8, "epochs": 3, "max_steps": 40, "resume": "auto", **train_kw},
                    output={"checkpoint_every": 0})


def _stop_at(monkeypatch, world, step):
    """Rank 0 gets SIGUSR1 (as from Slurm) during step `step`: every rank checkpoints after
    it and stops."""
    agree = Step.agree

    def signal_then_agree(self, stop, loss):
        if self.steps + 1 == step and world.is_root:
            stop_flag().signum = signal.SIGUSR1
        return agree(self, stop, loss)
    monkeypatch.setattr(Step, "agree", signal_then_agree)


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


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_a_max_steps_stop_resumes_bit_identically(world, shared_tmp, digits_h5, make_cfg, strategy):
    """train.max_steps = K, then the same job without the limit: equal to the uninterrupted
    run bit for bit, at a random K (mid-block included) and at an epoch end. The stop's
    evaluation and checkpoint consolidate a copy: no synchronisation the uninterrupted run
    lacks (issue: a bmuf stop at K = 16 differed by 0.027)."""
    steps_per_epoch = -(-1438 // (8 * world.size))
    total = min(40, 3 * steps_per_epoch)
    ks = {random.Random(f"max-{strategy}-{world.size}").randrange(2, total - 1), min(steps_per_epoch, total - 1)}
    _, ref = train(_cfg(make_cfg, shared_tmp / "ref", digits_h5, strategy), world, world.logger())
    for k in sorted(ks):
        run = shared_tmp / f"k{k}"
        train(_cfg(make_cfg, run, digits_h5, strategy, max_steps=k), world, world.logger())
        _, got = train(_cfg(make_cfg, run, digits_h5, strategy), world, world.logger())
        if strategy == "ps_sync" and world.size > 2:  # >2 accumulates into the store associate freely
            torch.testing.assert_close(params(got), params(ref), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(params(got), params(ref)), (strategy, k, (params(got) - params(ref)).abs().max())


def test_a_max_steps_stop_at_an_epoch_end_keeps_its_row(world, shared_tmp, digits_h5, make_cfg):
    """Stopped by max_steps exactly at the end of epoch 1, then resumed: epoch 1's row is the
    one written before the stop (not replaced by an empty epoch with train_loss 0)."""
    steps_per_epoch = -(-1438 // (8 * world.size))
    run = shared_tmp / "edge"
    train(_cfg(make_cfg, run, digits_h5, "allreduce", max_steps=steps_per_epoch), world, world.logger())
    before = world.bcast((run / "metrics.jsonl").read_text() if world.is_root else None)
    train(_cfg(make_cfg, run, digits_h5, "allreduce", max_steps=steps_per_epoch + 3), world, world.logger())
    rows = [json.loads(ln) for ln in world.bcast((run / "metrics.jsonl").read_text() if world.is_root else "")
            .splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and json.loads(before.splitlines()[0]) == rows[0], rows


@pytest.mark.parametrize("strategy", ["local_sgd", "post_local_sgd", "bmuf", "easgd"])
def test_evaluation_does_not_change_training(world, shared_tmp, digits_h5, make_cfg, strategy):
    """Evaluating every epoch or only at the end gives the same final parameters, with
    periods that do not divide the epoch (a block runs on across the epoch end)."""
    options = {**OPTIONS.get(strategy, {}), "period": 7}
    every = _cfg(make_cfg, shared_tmp / "every", digits_h5, strategy, options, eval_every=1, max_steps=0)
    _, a = train(every, world, world.logger())
    rarely = _cfg(make_cfg, shared_tmp / "rarely", digits_h5, strategy, options, eval_every=3, max_steps=0)
    _, b = train(rarely, world, world.logger())
    assert torch.equal(params(a), params(b)), (strategy, (params(a) - params(b)).abs().max())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", COMPRESS)
def test_compressed_resume_is_exact(world, shared_tmp, digits_h5, make_cfg, monkeypatch, kind):
    """Every rank's error-feedback residuals and PowerSGD's Q are checkpointed (the
    residuals per rank, no per-rank parameters): stop at step k, resume, and the parameters
    equal the uninterrupted run's bit for bit."""
    steps_per_epoch = -(-1438 // (8 * world.size))
    stop = random.Random(f"{kind}-{world.size}").randrange(2, min(40, 3 * steps_per_epoch) - 1)
    opts = COMPRESS[kind]
    _, ref = train(_cfg(make_cfg, shared_tmp / "ref", digits_h5, "allreduce", opts), world, world.logger())
    _stop_at(monkeypatch, world, stop)
    with pytest.raises(Stopped, match=f"after step {stop}"):
        train(_cfg(make_cfg, shared_tmp / "run", digits_h5, "allreduce", opts), world, world.logger())
    stop_flag().signum = 0
    monkeypatch.undo()

    def saved():
        tree = checkpoint.read(checkpoint.path_for(shared_tmp / "run", stop))
        own = [_flat(r.get("strategy", {})) for r in tree["ranks"].values()]
        q = sorted(k for k in _flat(tree["strategy"]) if "_q" in k)
        return [sorted(o) for o in own], q, any(np.any(v != 0) for o in own for v in o.values())
    keys, q, nonzero = world.bcast(saved() if world.is_root else None)  # every rank asserts alike
    assert len(keys) == world.size and all(k and all(kind in n for n in k) for k in keys), keys
    assert nonzero and (q if kind == "powersgd" else not q), (q, nonzero)
    _, got = train(_cfg(make_cfg, shared_tmp / "run", digits_h5, "allreduce", opts), world, world.logger())
    assert torch.equal(params(got), params(ref)), (kind, stop)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


def _flat(tree: dict, prefix: str = "") -> dict:
    """A tree's arrays keyed by their paths."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume_observed(world, cfg, monkeypatch):
    """Train cfg (a resume); returns (log lines, the compressor's (own, shared) state right
    after setup and right after restore_strategy, flattened, final params)."""
    seen, orig = {}, state.restore_strategy

    def spy(step, tree, log=None):
        seen["fresh"] = (_flat(step.strategy.rank_state_dict()), _flat(step.strategy.state_dict()))
        orig(step, tree, log)
        seen["restored"] = (_flat(step.strategy.rank_state_dict()), _flat(step.strategy.state_dict()))
    monkeypatch.setattr(state, "restore_strategy", spy)
    log, lines = world.logger(), _Lines()
    log.addHandler(lines)
    try:
        _, model = train(cfg, world, log)
    finally:
        log.removeHandler(lines)
        monkeypatch.undo()
    return lines.lines, seen, params(model)


def _rewrite(world, path, change):
    """Rank 0 rewrites the checkpoint at path with change(tree, meta) applied."""
    def edit():
        tree = checkpoint.read(path)
        meta = tree.pop("meta")
        change(tree, meta)
        tree["optim"]["param_groups"] = json.dumps(tree["optim"]["param_groups"])
        checkpoint.write(path, tree, meta)
    world.on_root(edit)


@pytest.mark.timeout(240)
def test_compressed_resume_at_another_world_size(world, shared_tmp, digits_h5, make_cfg, monkeypatch):
    """A checkpoint of N+1 ranks resumed at N: the residuals cannot be mapped and are
    dropped with one warning on rank 0 (zeros); PowerSGD's Q is kept; training goes on."""
    run, opts = shared_tmp / "ws", COMPRESS["powersgd"]
    train(_cfg(make_cfg, run, digits_h5, "allreduce", opts, max_steps=6), world, world.logger())

    def one_more_rank(tree, meta):  # as if written at world.size + 1 ranks
        tree["ranks"][str(len(tree["ranks"]))] = tree["ranks"][str(len(tree["ranks"]) - 1)]
        meta["world_size"] += 1
    _rewrite(world, checkpoint.path_for(run, 6), one_more_rank)
    saved_q = world.bcast(_flat(checkpoint.read(checkpoint.path_for(run, 6))["strategy"]) if world.is_root else None)
    lines, seen, p = _resume_observed(world, _cfg(make_cfg, run, digits_h5, "allreduce", opts, max_steps=10),
                                      monkeypatch)
    own, shared = seen["restored"]
    assert own and all(not np.any(a) for a in own.values())  # dropped: zeros
    assert shared and all(np.array_equal(a, saved_q[k]) for k, a in shared.items())  # Q kept
    assert not all(np.array_equal(a, seen["fresh"][1][k]) for k, a in shared.items())
    warned = [m for lvl, m in lines if lvl == logging.WARNING]
    if world.is_root:
        assert len(warned) == 1 and f"written at {world.size + 1} ranks" in warned[0], lines
        assert not any("holds no" in m for _, m in lines), lines
    else:
        assert not warned
    assert torch.isfinite(p).all()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("written, resumed", [("powersgd", "powersgd"), ("topk", "sign")])
def test_checkpoint_without_compressor_state(world, shared_tmp, digits_h5, make_cfg, monkeypatch, written, resumed):
    """An older checkpoint (no compressor state at all) or one written with another compress
    resumes with zero residuals and a fresh Q, and one info line on rank 0."""
    run = shared_tmp / "old"
    train(_cfg(make_cfg, run, digits_h5, "allreduce", COMPRESS[written], max_steps=6), world, world.logger())
    if written == resumed:  # as an older mpitrain wrote it
        def strip(tree, meta):
            tree["strategy"] = {}
            for r in tree["ranks"].values():
                r.pop("strategy", None)
        _rewrite(world, checkpoint.path_for(run, 6), strip)
    lines, seen, p = _resume_observed(
        world, _cfg(make_cfg, run, digits_h5, "allreduce", COMPRESS[resumed], max_steps=10), monkeypatch)
    (own, shared), (_, fresh_shared) = seen["restored"], seen["fresh"]
    assert own and all(not np.any(a) for a in own.values())
    assert set(shared) == set(fresh_shared) and all(np.array_equal(a, fresh_shared[k]) for k, a in shared.items())
    infos = [m for lvl, m in lines if "holds no" in m]
    if world.is_root:
        assert len(infos) == 1 and f"no {resumed} state" in infos[0], lines
        assert not any(lvl >= logging.WARNING for lvl, _ in lines), lines
    else:
        assert not infos
    assert torch.isfinite(p).all()


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
