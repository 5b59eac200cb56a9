"""Conformance over the strategy registry: a strategy is tested by being registered.

Every registered strategy, at any world size: trains digits to >= 95 % test accuracy,
round-trips a checkpoint (resuming a finished run re-saves the same model and strategy
state), reports the common metrics keys, and rejects a bad option with one line."""

import dataclasses

import numpy as np
import pytest

from mpitrain import checkpoint, config
from mpitrain.errors import UserError
from mpitrain.sync import REGISTRY, Stateful
from mpitrain.train import train

pytestmark = pytest.mark.mpi
STRATEGIES = sorted(REGISTRY)
COMMON_KEYS = {"epoch", "step", "ranks", "train_loss", "samples_per_s", "lr", "comm_bytes_per_step",
               "test_loss", "test_acc", "wall_s"}
# the one tuning a strategy needs beyond its defaults: local momentum on top of BMUF's block
# momentum compounds (Chen & Huo run plain local SGD), so it gets plain SGD with a larger lr
TUNING = {"bmuf": {"momentum": 0.0, "lr": 0.1}}


@pytest.mark.parametrize("name", STRATEGIES)
def test_trains_digits_to_95_percent(world, shared_tmp, digits_h5, make_cfg, name):
    cfg = make_cfg(shared_tmp / name, digits_h5, sync={"strategy": name},
                   model={"name": "cnn", "channels": [16, 32]},
                   optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "warmup_epochs": 1, **TUNING.get(name, {})},
                   train={"batch_size": 16, "epochs": 8})
    row, model = train(cfg, world, world.logger())
    if model is None:  # a rank the strategy kept for itself
        return
    assert row["test_acc"] >= 0.95, row
    assert COMMON_KEYS <= set(row), COMMON_KEYS - set(row)
    assert row["comm_bytes_per_step"] > 0 or world.size == 1, row


@pytest.mark.parametrize("name", STRATEGIES)
def test_checkpoint_round_trip(world, shared_tmp, digits_h5, make_cfg, name):
    """Resuming a finished run restores model, optimizer and strategy state: the checkpoint
    it writes again holds exactly what the first run saved. easgd_async: every rank's own
    replica (what training resumes from) exactly; its consolidated center is the shared
    center after each rank's last elastic update, which depends on their timing."""
    kw = dict(sync={"strategy": name}, model={"name": "mlp", "hidden": [32]},
              train={"batch_size": 8, "epochs": 2, "max_steps": 10, "resume": "auto"})
    run = shared_tmp / name
    train(make_cfg(run, digits_h5, **kw), world, world.logger())
    world.barrier()
    first = checkpoint.read(checkpoint.path_for(run, 10)) if world.is_root else None
    world.barrier()
    train(make_cfg(run, digits_h5, **kw), world, world.logger())  # resumes at step 10: nothing left
    if world.is_root:
        again = checkpoint.read(checkpoint.path_for(run, 10))
        assert again["position"]["step"] == first["position"]["step"] == 10
        timing = name == "easgd_async"
        parts = [("ranks", r, "replica", "model") for r in first["ranks"]] if timing else [("model",), ("strategy",)]
        for part in parts:
            a, b = checkpoint.lookup(first, "/".join(part)), checkpoint.lookup(again, "/".join(part))
            assert a is not None and set(a) == set(b), part
            for k in a:
                assert np.array_equal(a[k], b[k]), (part, k)
        if issubclass(REGISTRY[name], Stateful) and name != "allreduce":  # allreduce's: its compressor's, if any
            assert first["strategy"], f"{name} is Stateful but saved no state"


@pytest.mark.parametrize("name", STRATEGIES)
def test_bad_option_is_one_line(name):
    options = REGISTRY[name].Options
    fields = dataclasses.fields(options)
    raws = [{"sync": {"strategy": name, name: {"no_such_option": 1}}}]
    if fields:
        raws.append({"sync": {"strategy": name, name: {fields[0].name: "not-a-number"}}})
    for raw in raws:
        with pytest.raises(UserError) as e:
            config.from_dict(raw, "<test>")
        msg = str(e.value)
        assert "\n" not in msg and f"sync.{name}." in msg, msg


@pytest.mark.parametrize("name", STRATEGIES)
def test_declares_the_protocol(name):
    cls = REGISTRY[name]
    assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen
    assert isinstance(cls.sums_gradients, bool) and isinstance(cls.uneven_steps, bool)
    for method in ("setup", "after_backward", "after_step", "consolidated"):
        assert callable(getattr(cls, method, None)), f"{name} lacks {method}"
