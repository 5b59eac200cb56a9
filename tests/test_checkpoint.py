"""Checkpoints: bit-identical resume, corrupted files skipped, wrong model refused, resharding."""

import h5py
import pytest
import torch

from mpitrain import checkpoint, state
from mpitrain.errors import AgreedError, UserError
from mpitrain.train import train

pytestmark = pytest.mark.mpi


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture
def cfg_for(make_cfg, digits_h5):
    """cfg_for(run_dir, data, **train_kw): a small MLP job with dropout, momentum and warm-up."""
    def make(run_dir, data, **train_kw):
        return make_cfg(run_dir, digits_h5, model={"name": "mlp", "hidden": [24], "dropout": 0.1},
                        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "warmup_epochs": 0.5},
                        data=data, train={"batch_size": 8, "epochs": 2, "resume": "auto", **train_kw},
                        output={"checkpoint_every": 0})
    return make


@pytest.mark.parametrize("data", [{"mode": "replicated"}, {"mode": "partitioned"}])
def test_interrupted_and_resumed_run_is_bit_identical(world, shared_tmp, cfg_for, data):
    """Model, momentum, LR schedule, sampler position and dropout RNG all come back."""
    full = cfg_for(shared_tmp / "full", data, max_steps=70)
    _, ref = train(full, world, world.logger())
    part = cfg_for(shared_tmp / "part", data, max_steps=23)  # stops mid-epoch
    _, first = train(part, world, world.logger())
    assert checkpoint.list_checkpoints(shared_tmp / "part")[0].name == "ckpt-000000023.h5"
    resumed = cfg_for(shared_tmp / "part", data, max_steps=70)
    row, got = train(resumed, world, world.logger())
    assert row["step"] == 70
    assert torch.equal(params(got), params(ref))


def test_corrupted_newest_checkpoint_is_skipped(world, shared_tmp, digits_h5, make_cfg):
    cfg = make_cfg(shared_tmp / "r", digits_h5, model={"name": "mlp", "hidden": [24]},
                   train={"batch_size": 8, "epochs": 2, "max_steps": 12}, output={"checkpoint_every": 4, "keep": 5})
    train(cfg, world, world.logger())
    ckpts = checkpoint.list_checkpoints(shared_tmp / "r")
    assert [p.name for p in ckpts][:2] == ["ckpt-000000012.h5", "ckpt-000000008.h5"]
    world.barrier()
    if world.is_root:
        with h5py.File(ckpts[0], "r+") as f:  # flip values, keep the stored checksum
            d = f["model/1.weight"]
            d[0, 0] = d[0, 0] + 1.0
        with pytest.raises(Exception, match="checksum"):
            checkpoint.read(ckpts[0])
    world.barrier()
    job_cfg = make_cfg(shared_tmp / "r", digits_h5, model={"name": "mlp", "hidden": [24]},
                       train={"batch_size": 8, "epochs": 2, "max_steps": 14, "resume": "auto"},
                       output={"checkpoint_every": 0})
    row, _ = train(job_cfg, world, world.logger())
    assert row["step"] == 14  # resumed from step 8 (the valid one), then trained 6 steps


def test_checkpoint_from_another_model_is_refused(world, shared_tmp, digits_h5, make_cfg):
    cfg = make_cfg(shared_tmp / "m", digits_h5, model={"name": "mlp", "hidden": [24]},
                   train={"batch_size": 8, "max_steps": 3})
    train(cfg, world, world.logger())
    other = make_cfg(shared_tmp / "m", digits_h5, model={"name": "mlp", "hidden": [32]},
                     train={"batch_size": 8, "max_steps": 6, "resume": "auto"})
    with pytest.raises(AgreedError, match="checkpoint from another model"):
        train(other, world, world.logger())


def test_consistency_check_names_the_differing_rank(world, shared_tmp, digits_h5, make_cfg):
    if world.size == 1:
        return  # nothing to differ from
    lr = 0.1 if world.rank != world.size - 1 else 0.2
    cfg = make_cfg(shared_tmp / "c", digits_h5, optim={"lr": lr}, train={"max_steps": 2})
    with pytest.raises(AgreedError, match=f"config differs between rank 0 and rank {world.size - 1}"):
        train(cfg, world, world.logger())


@pytest.mark.parametrize("strategy, options", [("ps_sync", {}), ("bmuf", {"period": 3}),
                                               ("easgd_async", {"period": 3})])
def test_strategy_state_round_trips(world, shared_tmp, digits_h5, make_cfg, strategy, options):
    sync = {"strategy": strategy, strategy: options}
    cfg = make_cfg(shared_tmp / strategy, digits_h5, model={"name": "mlp", "hidden": [16]},
                   optim={"name": "sgd", "lr": 0.05, "momentum": 0.9}, sync=sync,
                   train={"batch_size": 8, "max_steps": 10})
    train(cfg, world, world.logger())
    tree = checkpoint.read(checkpoint.list_checkpoints(shared_tmp / strategy)[0])
    assert tree["meta"]["strategy"] == strategy and tree["strategy"]
    n = sum(a.size for a in tree["model"].values())
    for k, v in tree["strategy"].items():
        assert v.size in (1, n) or v.shape[-1] == n, (k, v.shape)
    more = make_cfg(shared_tmp / strategy, digits_h5, model={"name": "mlp", "hidden": [16]},
                    optim={"name": "sgd", "lr": 0.05, "momentum": 0.9}, sync=sync,
                    train={"batch_size": 8, "max_steps": 14, "resume": "auto"})
    row, _ = train(more, world, world.logger())
    assert row["step"] == 14


def test_inspect_reports_validity(world, shared_tmp, digits_h5, make_cfg):
    cfg = make_cfg(shared_tmp / "i", digits_h5, train={"max_steps": 2})
    train(cfg, world, world.logger())
    if world.is_root:
        p = checkpoint.list_checkpoints(shared_tmp / "i")[0]
        text = checkpoint.describe(str(p))
        assert "valid (whole-file sha256" in text and "/rng/torch_cpu" in text and "crc32" in text
        assert state.Position().step == 0
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad = p.with_name("ckpt-999999999.h5")
        bad.write_bytes(bytes(data))
        with pytest.raises(UserError, match="INVALID: .*whole-file checksum mismatch"):
            checkpoint.describe(str(bad))
        bad.write_bytes(bytes(data[:1000]))
        with pytest.raises(UserError, match="INVALID: .*trailer"):
            checkpoint.describe(str(bad))


def test_a_long_checkpoint_write_shows_progress(tmp_path):
    """Every 16 MB written is a watchdog tick, so a big checkpoint never looks like a hang."""
    import numpy as np

    from mpitrain.comm import heartbeat

    tree = {"position": {"step": 1, "epoch": 0, "samples_in_epoch": 0},
            "model": {"w": np.zeros(50 * 2**20 // 4, np.float32)}, "optim": {"param_groups": "[]"},
            "ranks": {"0": {"rng": {"torch_cpu": np.zeros(8, np.uint8)}}}}
    before = heartbeat._progress["count"]
    checkpoint.write(tmp_path / "ckpt-000000001.h5", tree, {"world_size": 1})
    assert heartbeat._progress["count"] - before >= 50 // 16
