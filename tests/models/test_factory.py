"""Your own model and loss from a job file: model.factory / [model.args] / train.loss."""

import dataclasses

import pytest
import torch

from mpitrain.errors import AgreedError, UserError
from mpitrain.data.hdf5 import Meta
from mpitrain.models import build_model
from mpitrain.tasks import build_loss
from mpitrain.train import train

pytestmark = pytest.mark.mpi

MODULE = '''
import torch
from torch import nn

def tiny(input_shape, num_classes, width=8):
    n = 1
    for s in input_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, num_classes))

def per_sample_ce(output, target):
    return nn.functional.cross_entropy(output, target, reduction="none")

def mean_ce(output, target):
    return nn.functional.cross_entropy(output, target)

def wrong_shape(output, target):
    return output

def broken(input_shape, num_classes):
    raise ValueError("kaboom")

def not_a_module(input_shape, num_classes):
    return 42

def narrow(input_shape, num_classes):
    return tiny(input_shape, num_classes - 1)

def one_score(input_shape, num_classes):
    return nn.Sequential(tiny(input_shape, 1), nn.Flatten(0))  # (B,): one score per sample

def frozen_output(input_shape, num_classes):
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny(input_shape, num_classes)

        def forward(self, x):
            with torch.no_grad():
                return self.net(x)
    return Frozen()

def detached_ce(output, target):
    return nn.functional.cross_entropy(output, target).detach()

def item_ce(output, target):
    return torch.tensor(nn.functional.cross_entropy(output, target).item(), requires_grad=True)

CONSTANT = 3
'''


@pytest.fixture
def job_dir(world, shared_tmp):
    """A folder with a user module, as the job file's folder would be."""
    if world.is_root:
        (shared_tmp / "usermodels_t.py").write_text(MODULE)
    world.barrier()
    return str(shared_tmp)


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(make_cfg, job_dir, run, digits_h5, world, **sections):
    sections.setdefault("train", {"batch_size": 8, "max_steps": 6, "epochs": 1})
    cfg = dataclasses.replace(make_cfg(run, digits_h5, **sections), job_dir=job_dir)
    return train(cfg, world, world.logger())


def test_a_user_factory_with_args(world, shared_tmp, digits_h5, make_cfg, job_dir):
    row, model = _run(make_cfg, job_dir, shared_tmp / "u", digits_h5, world,
                      model={"factory": "usermodels_t:tiny", "args": {"width": 16}})
    assert model[1].out_features == 16 and model[3].out_features == 10  # num_classes from the data
    assert row["test_acc"] > 0


def test_builtin_name_is_the_builtin_factory(world, shared_tmp, digits_h5, make_cfg, job_dir):
    _, a = _run(make_cfg, job_dir, shared_tmp / "a", digits_h5, world, model={"name": "mlp", "hidden": [20]})
    _, b = _run(make_cfg, job_dir, shared_tmp / "b", digits_h5, world,
                model={"factory": "mpitrain.models:mlp", "args": {"hidden": [20]}})
    assert torch.equal(params(a), params(b))


@pytest.mark.parametrize("loss", ["usermodels_t:per_sample_ce", "usermodels_t:mean_ce"])
def test_a_user_loss_equals_the_builtin(world, shared_tmp, digits_h5, make_cfg, job_dir, loss):
    kw = {"model": {"name": "mlp", "hidden": [20]}}
    _, ref = _run(make_cfg, job_dir, shared_tmp / "ce", digits_h5, world, **kw)
    _, got = _run(make_cfg, job_dir, shared_tmp / "u", digits_h5, world,
                  train={"batch_size": 8, "max_steps": 6, "epochs": 1, "loss": loss}, **kw)
    torch.testing.assert_close(params(got), params(ref), rtol=1e-5, atol=1e-6)


def test_mse_against_one_hot_labels_trains(world, shared_tmp, digits_h5, make_cfg, job_dir):
    row, _ = _run(make_cfg, job_dir, shared_tmp / "m", digits_h5, world,
                  train={"batch_size": 16, "epochs": 3, "loss": "mse"}, optim={"lr": 0.5, "momentum": 0.9})
    assert row["test_acc"] > 0.5, row


@pytest.mark.parametrize("factory, args, message", [
    ("nosuchmodule_x:f", {}, "cannot import it (ModuleNotFoundError"),
    ("usermodels_t:nope", {}, "cannot import it (AttributeError"),
    ("usermodels_t", {}, "expected 'package.module:function'"),
    ("usermodels_t:CONSTANT", {}, "not callable (int)"),
    ("usermodels_t:not_a_module", {}, "returned int, not a torch.nn.Module"),
    ("usermodels_t:broken", {}, "failed to build the model with no [model.args] (ValueError: kaboom)"),
    ("usermodels_t:tiny", {"depth": 3}, "unexpected keyword argument 'depth'"),
])
def test_bad_factories_are_one_line(job_dir, factory, args, message):
    from mpitrain.config import ModelCfg

    with pytest.raises(UserError) as e:
        build_model(ModelCfg(factory=factory, args=args), Meta((8, 8), 10), job_dir)
    assert message in str(e.value) and "model." in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model, loss, message", [
    ("usermodels_t:narrow", "auto", "model 'usermodels_t:narrow' returns outputs of shape (2, 9) for a batch of 2 "
                                    "samples; expected (2, 10) class scores (num_classes = 10 from the data)"),
    ("usermodels_t:one_score", "auto", "model 'usermodels_t:one_score' returns outputs of shape (2,) for a batch"),
    ("usermodels_t:frozen_output", "auto", "model 'usermodels_t:frozen_output' returns outputs without a gradient"),
    ("usermodels_t:tiny", "usermodels_t:detached_ce", "train.loss = 'usermodels_t:detached_ce' returns a loss "
                                                      "without a gradient"),
    ("usermodels_t:tiny", "usermodels_t:item_ce", "train.loss = 'usermodels_t:item_ce' returns a loss without"),
])
def test_outputs_that_do_not_fit_the_data_and_detached_losses_are_one_line(world, shared_tmp, digits_h5, make_cfg,
                                                                          job_dir, model, loss, message):
    """Checked on every rank's first samples before training: one line naming the factory
    or the loss on every rank (the first forward would raise out of cross_entropy or
    backward, a traceback, on some ranks only; a leaf loss would silently train nothing)."""
    with pytest.raises(AgreedError) as e:
        _run(make_cfg, job_dir, shared_tmp / "x", digits_h5, world, model={"factory": model},
             train={"batch_size": 8, "max_steps": 2, "epochs": 1, "loss": loss})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_losses(job_dir):
    with pytest.raises(UserError, match="train.loss = 'nosuch:f': cannot import"):
        build_loss("nosuch:f", "classify", job_dir)
    fn = build_loss("usermodels_t:wrong_shape", "classify", job_dir)
    with pytest.raises(UserError, match="expected per-sample losses"):
        fn(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_checkpoint_refuses_another_factory(world, shared_tmp, digits_h5, make_cfg, job_dir):
    run = shared_tmp / "r"
    _run(make_cfg, job_dir, run, digits_h5, world, model={"factory": "usermodels_t:tiny", "args": {"width": 32}},
         train={"batch_size": 8, "max_steps": 2, "epochs": 1, "resume": "auto"})
    with pytest.raises(AgreedError, match="trained with 'usermodels_t:tiny', this job builds 'mpitrain.models:mlp'"):
        _run(make_cfg, job_dir, run, digits_h5, world, model={"name": "mlp", "hidden": [32]},
             train={"batch_size": 8, "max_steps": 4, "epochs": 1, "resume": "auto"})
