"""Pipelines from the job file (`[parallel] pipeline_stages`): a P x D run equals the plain
data-parallel run with the same global batch, and checkpoints keep the whole model's layout
(a pipelined run resumes without the pipeline, at another P, and the other way round)."""

import numpy as np
import pytest

from mpitrain import checkpoint
from mpitrain.errors import AgreedError, UserError
from mpitrain.train import train

pytestmark = pytest.mark.mpi


def _stages(world, which):
    """P for the parametrisation: "all" = one stage per rank (D = 1), 2 = two stages (D = N / 2)."""
    p = world.size if which == "all" else which
    if p < 2 or world.size % p:
        pytest.skip(f"P = {p} needs a world size that is a multiple >= 2 (this is {world.size})")
    return p


@pytest.fixture(scope="module")
def tokens_h5(world, tmp_path_factory):
    """A small token stream (vocab 17) for the gpt: 3,000 train, 400 test tokens."""
    import h5py

    path = None
    if world.is_root:
        path = tmp_path_factory.mktemp("tokens") / "tokens.h5"
        rng = np.random.default_rng(3)
        with h5py.File(path, "w") as f:
            f.attrs["vocab_size"] = 17
            f["train/tokens"] = (np.arange(3000) * 7 + rng.integers(0, 3, 3000)) % 17
            f["test/tokens"] = (np.arange(400) * 7) % 17
    return world.bcast(path)


def _job(make_cfg, run, data, world, p, steps, model="mlp", schedule="1f1b", strategy="allreduce", **more):
    """The same global batch (24 samples) at any P and world size: replicated data in one
    global order, per replica 24 / D."""
    d = world.size // p
    models = {"mlp": {"name": "mlp", "hidden": [24, 24, 24]},  # (4 blocks with parameters: P <= 4)
              "gpt": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "n_embd": 16}}}
    extra = {"seq_len": 8} if model == "gpt" else {}
    return make_cfg(run, data, model=models[model], data={"mode": "replicated", "shuffle": "global", **extra},
                    optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "clip_norm": 1.0},
                    sync={"strategy": strategy},
                    train={"batch_size": 24 // d, "epochs": 1, "max_steps": steps, "resume": "auto", **more},
                    parallel={"pipeline_stages": p, "micro_batches": 3 if p > 1 else 1, "schedule": schedule},
                    output={"checkpoint_every": 0})


def _params(path):
    tree = checkpoint.read(path)
    return {k: np.asarray(v) for k, v in tree["model"].items()}


def _same(world, a_path, b_path, rtol=1e-5):
    """Rank 0 compares two checkpoints' models; the verdict is agreed."""
    err = None
    if world.is_root:
        a, b = _params(a_path), _params(b_path)
        if set(a) != set(b):
            err = f"names differ: {sorted(set(a) ^ set(b))[:4]}"
        else:
            worst = max(float(np.abs(a[k] - b[k]).max() / (np.abs(b[k]).max() + 1e-8)) for k in a)
            err = None if worst <= rtol else f"largest relative difference {worst:.2e}"
    err = world.bcast(err)
    assert err is None, err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["mlp", "gpt"])
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("which", [2, "all"])
def test_a_pipelined_run_equals_data_parallel(world, shared_tmp, digits_h5, tokens_h5, make_cfg, model, schedule,
                                             which):
    p = _stages(world, which)
    data = digits_h5 if model == "mlp" else tokens_h5
    train(_job(make_cfg, shared_tmp / "dp", data, world, 1, 6, model), world, world.logger())
    row, _ = train(_job(make_cfg, shared_tmp / "pp", data, world, p, 6, model, schedule), world, world.logger())
    assert row["step"] == 6 and np.isfinite(row["train_loss"]) and "test_loss" in row
    _same(world, checkpoint.path_for(shared_tmp / "pp", 6), checkpoint.path_for(shared_tmp / "dp", 6))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_checkpoints_resume_across_layouts(world, shared_tmp, digits_h5, tokens_h5, make_cfg, model):
    """Written pipelined, resumed without the pipeline and at P = N; written without it,
    resumed pipelined: each equals the uninterrupted data-parallel run."""
    p = _stages(world, 2)
    data = digits_h5 if model == "mlp" else tokens_h5
    train(_job(make_cfg, shared_tmp / "ref", data, world, 1, 8, model), world, world.logger())
    for first, then in ((p, 1), (1, p), (p, world.size)):
        run = shared_tmp / f"run-{first}-{then}"
        train(_job(make_cfg, run, data, world, first, 4, model), world, world.logger())
        train(_job(make_cfg, run, data, world, then, 8, model), world, world.logger())
        _same(world, checkpoint.path_for(run, 8), checkpoint.path_for(shared_tmp / "ref", 8))


@pytest.mark.timeout(240)
def test_zero_inside_the_stages_equals_data_parallel(world, shared_tmp, digits_h5, make_cfg):
    p = _stages(world, 2)
    train(_job(make_cfg, shared_tmp / "dp", digits_h5, world, 1, 5, strategy="zero"), world, world.logger())
    train(_job(make_cfg, shared_tmp / "pp", digits_h5, world, p, 5, strategy="zero"), world, world.logger())
    _same(world, checkpoint.path_for(shared_tmp / "pp", 5), checkpoint.path_for(shared_tmp / "dp", 5))


def test_bad_layouts_are_one_agreed_line(world, shared_tmp, digits_h5, make_cfg):
    cases = [({"pipeline_stages": world.size + 1}, "must divide the world size")]
    if world.size % 2 == 0:
        cases += [({"pipeline_stages": 2, "split": [1]}, "split"), ({"pipeline_stages": 2, "split": [1, 9]}, "split"),
                  ({"pipeline_stages": world.size * 4}, "must divide")]
    if world.size >= 4 and world.size % 4 == 0:  # the mlp [24]: Linear+ReLU, Linear: 2 blocks
        cases += [({"pipeline_stages": 4}, "more than the model's 2 blocks")]
    for parallel, words in cases:
        with pytest.raises((UserError, AgreedError)) as e:
            cfg = make_cfg(shared_tmp / "bad", digits_h5, data={"mode": "replicated"},
                           model={"name": "mlp", "hidden": [24]}, train={"batch_size": 8, "max_steps": 1},
                           parallel=parallel)
            train(cfg, world, world.logger())
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="micro_batches = 99"):
        make_cfg(shared_tmp / "bad", digits_h5, data={"mode": "replicated"}, train={"batch_size": 8},
                 parallel={"pipeline_stages": 2, "micro_batches": 99})
    with pytest.raises(UserError, match="data.mode = 'replicated'"):
        make_cfg(shared_tmp / "bad", digits_h5, parallel={"pipeline_stages": 2})
    with pytest.raises(UserError, match="sync.strategy = 'ssp'"):
        make_cfg(shared_tmp / "bad", digits_h5, data={"mode": "replicated"}, parallel={"pipeline_stages": 2},
                 sync={"strategy": "ssp"})


def test_blocks_are_a_sequence_with_parameters_in_each():
    import torch

    from mpitrain.parallel.stages import blocks_of

    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2),
                              torch.nn.Softmax(-1))
    blocks = blocks_of(seq)
    assert len(blocks) == 2 and all(any(True for _ in b.parameters()) for b in blocks)
    x = torch.randn(3, 2, 2)
    assert torch.equal(blocks[1](blocks[0](x)), seq(x))  # the same function, block by block
    with pytest.raises(UserError, match="not a sequence of blocks"):
        blocks_of(torch.nn.Linear(3, 3))
    with pytest.raises(UserError, match="no parameters"):
        blocks_of(torch.nn.Sequential(torch.nn.ReLU()))
