"""Tensor parallelism from the job file (`[parallel] tensor = T`, the built-in gpt): a
D x T run equals the plain data-parallel run with the same global batch, and its
checkpoints keep the unsplit layout (resumable at another T and without it, both ways)."""

import numpy as np
import pytest

from mpitrain import checkpoint
from mpitrain.errors import AgreedError, UserError
from mpitrain.train import train

pytestmark = pytest.mark.mpi


def _tensor(world, which):
    t = world.size if which == "all" else which
    if t < 2 or world.size % t:
        pytest.skip(f"T = {t} needs a world size that is a multiple >= 2 (this is {world.size})")
    return t


@pytest.fixture(scope="module")
def tokens24(world, tmp_path_factory):
    """A token stream with 24 symbols (divisible by 1, 2, 3 and 4 tensor ranks)."""
    import h5py

    path = None
    if world.is_root:
        path = tmp_path_factory.mktemp("tok24") / "tokens.h5"
        rng = np.random.default_rng(3)
        with h5py.File(path, "w") as f:
            f.attrs["vocab_size"] = 24
            f["train/tokens"] = (np.arange(3000) * 7 + rng.integers(0, 3, 3000)) % 24
            f["test/tokens"] = (np.arange(400) * 5) % 24
    return world.bcast(path)


def _job(make_cfg, run, data, world, t, steps, **parallel):
    """The same global batch (24 windows) at any T: replicated data in one global order."""
    return make_cfg(run, data, model={"name": "gpt", "args": {"n_layer": 2, "n_head": 12, "n_embd": 24}},
                    data={"mode": "replicated", "shuffle": "global", "seq_len": 8},
                    optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "clip_norm": 1.0},
                    train={"batch_size": 24 * t // world.size, "epochs": 1, "max_steps": steps, "resume": "auto"},
                    parallel={"tensor": t, **parallel}, output={"checkpoint_every": 0})


def _same(world, a_path, b_path, rtol=1e-5):
    err = None
    if world.is_root:
        a, b = checkpoint.read(a_path), checkpoint.read(b_path)
        ma, mb = a["model"], b["model"]
        if set(ma) != set(mb) or set(a["optim"]["state"]) != set(b["optim"]["state"]):
            err = f"layouts differ: {sorted(set(ma) ^ set(mb))[:4]}"
        else:
            worst = max(float(np.abs(ma[k] - mb[k]).max() / (np.abs(mb[k]).max() + 1e-8)) for k in ma)
            err = None if worst <= rtol else f"largest relative difference {worst:.2e}"
    err = world.bcast(err)
    assert err is None, err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", [2, "all"])
def test_a_tensor_parallel_run_equals_data_parallel(world, shared_tmp, tokens24, make_cfg, which):
    t = _tensor(world, which)
    train(_job(make_cfg, shared_tmp / "dp", tokens24, world, 1, 5), world, world.logger())
    row, _ = train(_job(make_cfg, shared_tmp / "tp", tokens24, world, t, 5), world, world.logger())
    ref = [ln for ln in (shared_tmp / "dp" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert row["step"] == 5 and "test_ppl" in row
    import json

    dp_row = json.loads(ref[-1])
    assert abs(row["train_loss"] - dp_row["train_loss"]) < 1e-5 * dp_row["train_loss"], (row, dp_row)
    assert abs(row["test_loss"] - dp_row["test_loss"]) < 1e-5 * dp_row["test_loss"], (row, dp_row)
    _same(world, checkpoint.path_for(shared_tmp / "tp", 5), checkpoint.path_for(shared_tmp / "dp", 5))


@pytest.mark.timeout(300)
def test_checkpoints_resume_across_tensor_layouts(world, shared_tmp, tokens24, make_cfg):
    t = _tensor(world, 2)
    train(_job(make_cfg, shared_tmp / "ref", tokens24, world, 1, 8), world, world.logger())
    for first, then in ((t, 1), (1, t), (t, world.size)):
        run = shared_tmp / f"run-{first}-{then}"
        train(_job(make_cfg, run, tokens24, world, first, 4), world, world.logger())
        train(_job(make_cfg, run, tokens24, world, then, 8), world, world.logger())
        _same(world, checkpoint.path_for(run, 8), checkpoint.path_for(shared_tmp / "ref", 8))


def test_bad_tensor_layouts_are_one_agreed_line(world, shared_tmp, tokens24, digits_h5, make_cfg):
    with pytest.raises((UserError, AgreedError)) as e:
        train(_job(make_cfg, shared_tmp / "bad", tokens24, world, world.size + 1, 1), world, world.logger())
    assert "must divide the world size" in str(e.value) and "\n" not in str(e.value)
    if world.size % 5 == 0:
        pytest.skip("(5 heads divide)")
    if world.size >= 2 and world.size % 2 == 0:  # 5 heads over 2 ranks
        cfg = make_cfg(shared_tmp / "bad", tokens24, model={"name": "gpt", "args": {"n_layer": 1, "n_head": 5,
                                                                                     "n_embd": 10}},
                       data={"mode": "replicated", "seq_len": 8}, train={"max_steps": 1, "batch_size": 2},
                       parallel={"tensor": 2})
        with pytest.raises((UserError, AgreedError), match="n_head = 5") as e:
            train(cfg, world, world.logger())
        assert "\n" not in str(e.value)
    cases = [({"model": {"name": "mlp"}}, "tensor-parallel layers"),
             ({"sync": {"strategy": "zero"}}, "sync.strategy = 'allreduce'"),
             ({"parallel": {"tensor": 2, "pipeline_stages": 2}}, "3-D grid"),
             ({"data": {"mode": "partitioned", "seq_len": 8}}, "data.mode = 'replicated'")]
    for extra, words in cases:
        sections = {"model": {"name": "gpt"}, "data": {"mode": "replicated", "seq_len": 8}, "parallel": {"tensor": 2},
                    **extra}
        with pytest.raises(UserError, match=words):
            make_cfg(shared_tmp / "bad", tokens24, **sections)


@pytest.mark.timeout(240)
def test_export_of_a_tensor_parallel_run_is_the_unsplit_model(world, shared_tmp, tokens24, make_cfg):
    """`mpitrain export` of a T-split run: the plain gpt, each rank's trained slices of
    which are exactly its split parameters (the job's communicators are freed when train
    returns: compared slice by slice, no communication)."""
    import torch

    import mpitrain
    from mpitrain import export

    t = _tensor(world, "all")
    run = shared_tmp / "tx"
    _, model = train(_job(make_cfg, run, tokens24, world, t, 3), world, world.logger())
    path = shared_tmp / "tx.safetensors"
    if world.is_root:
        export.export(str(run), str(path))
    world.barrier()
    whole = mpitrain.load_model(str(path)).state_dict()
    bad = []
    for name, p in model.named_parameters():
        full, dim, start, stop = model.names()[name]
        want = whole[full] if dim is None else whole[full].narrow(dim, start, stop - start)
        if not torch.equal(want, p.detach().cpu()):
            bad.append(name)
    errs = [e for e in world.allgather(bad) if e]
    assert not errs, errs
