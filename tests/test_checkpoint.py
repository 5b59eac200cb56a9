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
        assert "valid (the file's sha256" in text and "/rng/torch_cpu" in text and "crc32" in text
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


# -- a checkpoint every rank writes part of (zero): pieces, block digests, lazy slabs ---------

def test_crc_combine_equals_the_crc_of_the_concatenation():
    import random
    import zlib

    rng = random.Random(7)
    for _ in range(50):
        a, b = rng.randbytes(rng.randrange(0, 3000)), rng.randbytes(rng.randrange(0, 3000))
        assert checkpoint.crc_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _written_together(tmp_path, monkeypatch, ranks=3):
    """A file written as `ranks` ranks would (state.save's steps, here in one process) with
    64-byte blocks: a (7, 5) optimizer tensor split into uneven pieces."""
    import numpy as np

    monkeypatch.setattr(checkpoint, "BLOCK", 64)
    full = np.arange(35, dtype=np.float32).reshape(7, 5) / 7
    cuts = [0, 12, 12, 35][:ranks] + [35]  # (one rank's piece is empty)
    mine = [{"optim": {"state": {"0": {"exp_avg": checkpoint.Pieces((7, 5), np.dtype("float32"),
                                                                    [(cuts[r], full.reshape(-1)[cuts[r]:cuts[r + 1]])])}}}}
            for r in range(ranks)]
    tree = {"position": {"step": 3, "epoch": 0, "samples_in_epoch": 0}, "model": {"w": np.ones((7, 5), np.float32)},
            "optim": {**mine[0]["optim"], "param_groups": '[{"lr": 0.1, "params": [0]}]'}, "strategy": {},
            "ranks": {"0": {"rng": {"torch_cpu": torch.get_rng_state().numpy()}}}}
    path = tmp_path / "ckpt-000000003.h5"
    crcs = checkpoint.whole_crcs(tree, [checkpoint.piece_crcs(m) for m in mine])
    placed = checkpoint.write_shell(path, tree, {"world_size": ranks, "strategy": "zero"}, crcs)
    for m in mine:
        checkpoint.write_pieces(path, m, placed)
    digests = {}
    for r in range(ranks):
        digests |= checkpoint.block_digests(path, r, ranks)
    checkpoint.seal(path, digests)
    return path, full


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_pieces_written_by_every_rank_read_back_whole_and_in_slices(tmp_path, monkeypatch, ranks):
    import numpy as np

    path, full = _written_together(tmp_path, monkeypatch, ranks)
    assert not path.with_name(path.name + ".tmp").exists() and path.read_bytes().endswith(b"\n")
    eager = checkpoint.read(path)  # whole arrays, every crc32 checked (the combined one too)
    assert np.array_equal(eager["optim"]["state"]["0"]["exp_avg"], full)
    lazy = checkpoint.read(path, lazy=True)
    slab = lazy["optim"]["state"]["0"]["exp_avg"]
    assert isinstance(slab, checkpoint.Slab) and isinstance(lazy["model"]["w"], checkpoint.Slab)
    assert isinstance(lazy["ranks"]["0"]["rng"]["torch_cpu"], np.ndarray)  # (only /model and /optim/state)
    assert np.array_equal(slab.read(11, 23), full.reshape(-1)[11:23])
    assert np.array_equal(np.asarray(slab), full)
    assert "valid" in checkpoint.describe(str(path))


def test_a_damaged_block_is_found_by_the_rank_that_checks_it(tmp_path, monkeypatch):
    path, _ = _written_together(tmp_path, monkeypatch)
    data = bytearray(path.read_bytes())
    data[64 * 5 + 3] ^= 1  # block 5
    path.write_bytes(bytes(data))
    owners = []
    for r in range(3):
        try:
            checkpoint.verify(path, r, 3)
        except UserError as e:
            owners.append(r)
            assert "checksum mismatch in block 5" in str(e) and "\n" not in str(e)
    assert owners == [5 % 3]
    with pytest.raises(UserError, match="block 5"):
        checkpoint.read(path)
    table = bytearray(path.read_bytes())
    table[-checkpoint.BLOCKS_LEN - 1] ^= 1  # the digest table itself
    path.write_bytes(bytes(table))
    with pytest.raises(UserError, match="table mismatch"):
        checkpoint.verify(path)


def test_pieces_that_do_not_tile_their_array_are_refused():
    import numpy as np

    tree = {"optim": {"state": {"0": {"m": checkpoint.Pieces((4,), np.dtype("float32"), [])}}}}
    with pytest.raises(ValueError, match="do not tile"):
        checkpoint.whole_crcs(tree, [[("/optim/state/0/m", 0, 0, 8)], [("/optim/state/0/m", 3, 0, 4)]])
    with pytest.raises(ValueError, match="cover 8 of 16"):
        checkpoint.whole_crcs(tree, [[("/optim/state/0/m", 0, 0, 8)]])


def test_the_probe_runs_under_a_jobs_own_memory_cap(tmp_path, monkeypatch):
    """Under `ulimit -v` (a hard address-space limit below the probe's own cap) the probe
    must not fail to set its limit: that made auto-resume skip every checkpoint."""
    import os
    import subprocess
    import sys

    path, _ = _written_together(tmp_path, monkeypatch)
    code = ("import resource, sys; cap = 3 * 2**30 + 2**29; resource.setrlimit(resource.RLIMIT_AS, (cap, cap)); "
            "from pathlib import Path; from mpitrain import checkpoint; "
            "print(checkpoint.read(Path(sys.argv[1]), isolated=True, lazy=True)['position']['step'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}  # (not a rank)
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stdout + r.stderr[-1500:]
