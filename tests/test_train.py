"""The training loop: N ranks equal one process with N times the batch, partitioned data
trains like replicated data, and the measured traffic per step."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpitrain.data.sampler import DistributedSampler
from mpitrain.train import train

pytestmark = pytest.mark.mpi
STEPS = 8
# float32, k steps: N ranks sum partial batches then allreduce, 1 process sums the whole
# batch in one matmul; the association differs, so parameters agree to rounding only.
RTOL, ATOL = 1e-4, 1e-6


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def single_process_reference(cfg, digits_h5, steps, size):
    """What one process with batch N*B does on the same global batches (no MPI)."""
    import h5py
    from mpitrain.data.hdf5 import Meta
    from mpitrain.models import build_model, build_optimizer, build_schedule

    with h5py.File(digits_h5, "r") as f:
        x, y = f["train/x"][:].astype(np.float32), f["train/y"][:].astype(np.int64)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, Meta(x.shape[1:], 10))
    opt = build_optimizer(cfg.optim, model.parameters(), 1)
    sampler = DistributedSampler(len(y), 1, 0, cfg.train.batch_size * size, cfg.train.seed, "global")
    sched = build_schedule(cfg.optim, opt, sampler.steps_per_epoch, cfg.train.epochs)
    done = 0
    for epoch in range(cfg.train.epochs):
        for b in sampler.epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(model(torch.from_numpy(x[b.indices])), torch.from_numpy(y[b.indices])).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                return model
    return model


@pytest.mark.parametrize("model, optim", [("mlp", "sgd"), ("cnn", "adamw")])
def test_n_ranks_equal_one_process_with_n_times_batch(world, shared_tmp, digits_h5, make_cfg, model, optim):
    cfg = make_cfg(shared_tmp / "run", digits_h5, model={"name": model, "hidden": [32]},
                   data={"mode": "replicated"}, optim={"name": optim, "lr": 0.01, "warmup_epochs": 0.5},
                   train={"batch_size": 8, "max_steps": STEPS, "epochs": 2},
                   sync={"allreduce": {"bucket_mb": 0.01, "first_bucket_mb": 0.001}})
    _, dist_model = train(cfg, world, world.logger())
    ref = single_process_reference(cfg, digits_h5, STEPS, world.size)
    a, b = flat_params(dist_model), flat_params(ref)
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    # and all ranks hold the same parameters, bit for bit
    all_a = world.allgather(a.numpy())
    assert all(np.array_equal(all_a[0], x) for x in all_a)


def test_partitioned_equals_replicated(world, shared_tmp, digits_h5, make_cfg):
    """Same sampler shuffle ('shard'): partitioned and replicated data train identically."""
    results = []
    for mode in ("partitioned", "replicated"):
        cfg = make_cfg(shared_tmp / mode, digits_h5, model={"name": "mlp", "hidden": [16]},
                       data={"mode": mode, "shuffle": "shard", "read_chunk": 100},
                       train={"batch_size": 7, "max_steps": 12, "epochs": 2})
        _, m = train(cfg, world, world.logger())
        results.append(flat_params(m))
    assert torch.equal(results[0], results[1])


def test_allreduce_traffic_is_one_gradient_per_step(world, shared_tmp, digits_h5, make_cfg):
    """comm_bytes_per_step is measured: allreduce hands MPI exactly the gradient each step
    (evaluation and metrics are control values, not traffic), at any world size."""
    cfg = make_cfg(shared_tmp / "bytes", digits_h5, model={"name": "mlp", "hidden": [32]},
                   train={"batch_size": 8, "max_steps": 10, "epochs": 2}, output={"checkpoint_every": 4})
    row, model = train(cfg, world, world.logger())
    n_params = sum(p.numel() for p in model.parameters())
    assert row["comm_bytes_per_step"] == 4 * n_params, (row, n_params)


def _digits_with_nan(world, path, digits_h5, samples, where="train"):
    """A copy of digits with a NaN pixel in the `where` samples `samples` (an index)."""
    import h5py

    if world.is_root:
        with h5py.File(digits_h5, "r") as src, h5py.File(path, "w") as dst:
            for split in ("train", "test"):
                x = src[f"{split}/x"][:]
                if split == where:
                    x[samples, 0, 0] = np.nan
                dst[f"{split}/x"], dst[f"{split}/y"] = x, src[f"{split}/y"][:]
    world.barrier()
    return path


@pytest.fixture
def digits_with_a_nan(world, shared_tmp, digits_h5):
    """digits with one NaN pixel in training sample 5."""
    return _digits_with_nan(world, shared_tmp / "nan.h5", digits_h5, 5)


@pytest.mark.parametrize("strategy", ["allreduce", "local_sgd", "ps_sync"])
def test_non_finite_loss_stops_before_applying_it(world, shared_tmp, digits_with_a_nan, make_cfg, strategy):
    from mpitrain import checkpoint
    from mpitrain.faults import Diverged

    cfg = make_cfg(shared_tmp / "stop", digits_with_a_nan, data={"check_finite": False, "shuffle": "none",
                                                                   "mode": "replicated"},
                   model={"name": "mlp", "hidden": [16]}, sync={"strategy": strategy},
                   train={"batch_size": 4, "epochs": 1}, output={"checkpoint_every": 1})
    bad_step = 5 // (4 * world.size) + 1  # sample 5 of the unshuffled set
    with pytest.raises(Diverged, match=rf"non-finite loss in step {bad_step} on rank \d") as e:
        train(cfg, world, world.logger())
    assert e.value.agreed and e.value.exit_code == 4
    if world.is_root:  # the newest checkpoint is the good step before
        names = [p.name for p in checkpoint.list_checkpoints(shared_tmp / "stop")]
        assert names[:1] == ([f"ckpt-{bad_step - 1:09d}.h5"] if bad_step > 1 else [])


@pytest.mark.parametrize("allreduce", [{}, {"overlap": "thread", "bucket_mb": 0.001, "first_bucket_mb": 0.001},
                                       {"overlap": "thread", "compress": {"kind": "topk", "ratio": 0.1}},
                                       {"overlap": "none", "compress": {"kind": "powersgd", "rank": 1, "min_numel": 0}}])
def test_non_finite_loss_skipped_on_every_rank(world, shared_tmp, digits_with_a_nan, make_cfg, allreduce):
    """The skipped step's reductions, launched during backward, are completed (skip_step)
    and leave no non-finite compressor state: training goes on, the replicas stay equal."""
    cfg = make_cfg(shared_tmp / "skip", digits_with_a_nan, data={"check_finite": False, "mode": "replicated"},
                   model={"name": "mlp", "hidden": [16]}, sync={"strategy": "allreduce", "allreduce": allreduce},
                   train={"batch_size": 4, "epochs": 1, "on_nonfinite": "skip"})
    row, model = train(cfg, world, world.logger())
    assert row["skipped_steps"] == 1, row
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    got = world.allgather(flat_params(model).numpy())
    assert all(np.array_equal(got[0], g) for g in got)


@pytest.fixture
def digits_all_nan(world, shared_tmp, digits_h5):
    """digits whose every training sample has a NaN pixel: every step's loss is non-finite."""
    return _digits_with_nan(world, shared_tmp / "allnan.h5", digits_h5, slice(None))


def test_skipping_forever_stops_and_logs_no_train_loss(world, shared_tmp, digits_all_nan, make_cfg):
    """on_nonfinite = "skip" stops (exit 4) after train.max_skipped consecutive skipped
    steps; with max_skipped = 0 an epoch of skipped steps logs train_loss null, not 0."""
    from mpitrain.faults import Diverged

    def cfg(run, **kw):
        return make_cfg(shared_tmp / run, digits_all_nan, data={"check_finite": False, "mode": "replicated"},
                        model={"name": "mlp", "hidden": [16]},
                        train={"batch_size": 8, "epochs": 1, "max_steps": 8, "on_nonfinite": "skip", **kw})
    with pytest.raises(Diverged, match="3 consecutive steps up to step 3 had a non-finite loss") as e:
        train(cfg("stop", max_skipped=3), world, world.logger())
    assert e.value.agreed and e.value.exit_code == 4
    row, _ = train(cfg("never", max_skipped=0), world, world.logger())
    assert row["skipped_steps"] == 8 and row["train_loss"] is None, row


@pytest.mark.parametrize("keep", [1, 2])
def test_checkpoints_after_skipped_steps_never_rotate_out_the_last_counted_one(world, shared_tmp, digits_h5,
                                                                                make_cfg, keep):
    """Every step after step 3 has a NaN (skipped, train.on_nonfinite = "skip"): however
    many checkpoints follow, output.keep never removes ckpt-4, the last one written after a
    counted step (step 3), also not after a resume (last_counted_step is in /meta)."""
    from mpitrain import checkpoint

    per_step = 4 * world.size  # unshuffled global batches: step k holds samples [(k-1) per_step, k per_step)
    data = _digits_with_nan(world, shared_tmp / "late.h5", digits_h5, slice(3 * per_step, None))
    run = shared_tmp / "run"

    def cfg(max_steps, resume):
        return make_cfg(run, data, data={"check_finite": False, "shuffle": "none", "mode": "replicated"},
                        model={"name": "mlp", "hidden": [16]}, output={"checkpoint_every": 2, "keep": keep},
                        train={"batch_size": 4, "epochs": 1, "max_steps": max_steps, "on_nonfinite": "skip",
                               "max_skipped": 0, "resume": resume})
    row, _ = train(cfg(8, "never"), world, world.logger())
    assert row["skipped_steps"] == 5 and row["train_loss"] is not None, row
    names = world.bcast([p.name for p in checkpoint.list_checkpoints(run)] if world.is_root else None)
    assert names == ["ckpt-000000008.h5", "ckpt-000000006.h5"][:keep] + ["ckpt-000000004.h5"], names
    train(cfg(12, "auto"), world, world.logger())  # resumed at step 8: steps 9..12 skipped too
    names = world.bcast([p.name for p in checkpoint.list_checkpoints(run)] if world.is_root else None)
    assert names == ["ckpt-000000012.h5", "ckpt-000000010.h5"][:keep] + ["ckpt-000000004.h5"], names
    counted = [checkpoint.read(run / n)["meta"]["last_counted_step"] for n in names]
    assert counted == [3] * len(names), counted


def test_non_finite_test_loss_is_a_divergence(world, shared_tmp, digits_h5, make_cfg):
    """A NaN in the test split: exit 4 with on_nonfinite = "stop", training goes on with "skip"."""
    from mpitrain.faults import Diverged

    data = _digits_with_nan(world, shared_tmp / "badtest.h5", digits_h5, 7, where="test")

    def cfg(run, how):
        return make_cfg(shared_tmp / run, data, data={"check_finite": False, "mode": "replicated"},
                        model={"name": "mlp", "hidden": [16]},
                        train={"batch_size": 8, "epochs": 1, "max_steps": 3, "on_nonfinite": how})
    with pytest.raises(Diverged, match=r"non-finite test loss after epoch 1 \(step 3\): stopped") as e:
        train(cfg("stop", "stop"), world, world.logger())
    assert e.value.agreed and e.value.exit_code == 4 and "\n" not in str(e.value)
    row, _ = train(cfg("skip", "skip"), world, world.logger())
    assert row["step"] == 3 and not np.isfinite(row["test_loss"]) and np.isfinite(row["train_loss"]), row


def test_a_planted_trace_json_symlink_is_not_followed(world, shared_tmp, digits_h5, make_cfg):
    run, target = shared_tmp / "run", shared_tmp / "target"
    if world.is_root:
        run.mkdir()
        target.write_text("precious")
        (run / "trace.json").symlink_to(target)
    world.barrier()
    train(make_cfg(run, digits_h5, train={"max_steps": 2, "trace": True}), world, world.logger())
    ok = world.bcast(target.read_text() == "precious" and not (run / "trace.json").is_symlink()
                     and "traceEvents" in (run / "trace.json").read_text() if world.is_root else None)
    assert ok


def test_an_unusable_tensorboard_folder_is_one_line(world, shared_tmp, digits_h5, make_cfg):
    """output.tensorboard with a file where RUN_DIR/tensorboard should be: one line on every
    rank at start-up (the job was asked for the event files), not a traceback on rank 0."""
    pytest.importorskip("tensorboard")
    from mpitrain.errors import AgreedError

    run = shared_tmp / "run"
    if world.is_root:
        run.mkdir()
        (run / "tensorboard").write_text("not a folder")
    world.barrier()
    with pytest.raises(AgreedError, match="output.tensorboard: cannot write event files to .*tensorboard: File "
                                          "exists") as e:
        train(make_cfg(run, digits_h5, train={"max_steps": 2}, output={"tensorboard": True}), world, world.logger())
    assert "\n" not in str(e.value)


def test_run_folder_writes_never_follow_planted_symlinks(world, shared_tmp, digits_h5, make_cfg):
    from mpitrain.errors import AgreedError

    run, target = shared_tmp / "run", shared_tmp / "target"
    if world.is_root:
        run.mkdir()
        target.write_text("precious")
        (run / "config.toml").symlink_to(target)  # replaced by a fresh file (rename)
        (run / "metrics.jsonl").symlink_to(target)  # appended to: refused
    world.barrier()
    cfg = make_cfg(run, digits_h5, train={"max_steps": 1})
    with pytest.raises(AgreedError, match="symbolic links"):
        train(cfg, world, world.logger())
    assert target.read_text() == "precious"
    if world.is_root:
        assert not (run / "config.toml").is_symlink()


# strategies that combine the ranks' gradients: the step sums the same global samples
# (local strategies step on each rank's own samples, which the grouping changes)
@pytest.mark.parametrize("strategy", ["allreduce", "ps_sync"])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(world, shared_tmp, digits_h5, make_cfg,
                                                                      strategy):
    """The same samples per optimizer step (global shuffle), reduced once per step."""
    def run(name, batch, k):
        cfg = make_cfg(shared_tmp / name, digits_h5, model={"name": "mlp", "hidden": [16]},
                       data={"mode": "replicated", "shuffle": "global"}, sync={"strategy": strategy},
                       train={"batch_size": batch, "accumulate": k, "max_steps": 6, "epochs": 1})
        return train(cfg, world, world.logger())
    row_a, a = run("acc", 4, 3)
    row_b, b = run("big", 12, 1)
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=1e-5, atol=1e-6)
    assert row_a["step"] == row_b["step"] == 6
    if strategy == "allreduce":  # one reduction per optimizer step, not per micro-batch
        assert row_a["comm_bytes_per_step"] == row_b["comm_bytes_per_step"]


def test_clip_norm_bounds_the_update_identically_on_every_rank(world, shared_tmp, digits_h5, make_cfg):
    import mpitrain.train as t

    norms = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        total = orig(params, max_norm, *a, **kw)
        norms.append((float(total), float(torch.cat([p.grad.reshape(-1) for p in params]).norm())))
        return total
    mp = pytest.MonkeyPatch()
    mp.setattr(t.torch.nn.utils, "clip_grad_norm_", spy)
    try:
        cfg = make_cfg(shared_tmp / "clip", digits_h5, model={"name": "mlp", "hidden": [16]},
                       optim={"lr": 0.1, "clip_norm": 0.05}, train={"batch_size": 8, "max_steps": 5, "epochs": 1})
        train(cfg, world, world.logger())
    finally:
        mp.undo()
    assert len(norms) == 5 and all(after <= 0.05 * 1.0001 for _, after in norms)
    assert any(before > 0.05 for before, _ in norms)  # it did clip
    got = world.allgather(norms)
    assert all(g == got[0] for g in got)  # the reduced gradient: the same norm everywhere


def test_bf16_autocast_trains_like_fp32(world, shared_tmp, digits_h5, make_cfg):
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = make_cfg(shared_tmp / precision, digits_h5, model={"name": "cnn", "channels": [8, 16]},
                       train={"batch_size": 16, "epochs": 4, "precision": precision})
        rows[precision], model = train(cfg, world, world.logger())
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights and gradients
    assert rows["bf16"]["test_acc"] >= rows["fp32"]["test_acc"] - 0.05, rows
