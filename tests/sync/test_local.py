"""Local-update strategies (local SGD, post-local SGD, BMUF, EASGD): equivalences and accuracy."""

import pytest
import torch

from test_ps import run

pytestmark = pytest.mark.mpi
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}


def test_local_sgd_every_step_is_allreduce(world, shared_tmp, digits_h5):
    """Momentum buffers stay local, yet H = 1 is exact: momentum is linear, so the mean
    of the local buffers is the buffer of the mean gradient."""
    _, ref = run(world, shared_tmp, digits_h5, "ar", "allreduce", optim=SGD_M)
    _, got = run(world, shared_tmp, digits_h5, "ls", "local_sgd", optim=SGD_M, sync={"period": 1})
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_post_local_sgd_phases(world, shared_tmp, digits_h5):
    _, ref = run(world, shared_tmp, digits_h5, "ar", "allreduce", optim=SGD_M)
    _, sync_phase = run(world, shared_tmp, digits_h5, "pl", "post_local_sgd", optim=SGD_M,
                        sync={"local_start": 1000, "period": 3})
    torch.testing.assert_close(sync_phase, ref, rtol=1e-5, atol=1e-6)
    _, local = run(world, shared_tmp, digits_h5, "ls", "local_sgd", optim=SGD_M, sync={"period": 3})
    _, local_phase = run(world, shared_tmp, digits_h5, "pl", "post_local_sgd", optim=SGD_M,
                         sync={"local_start": 0, "period": 3})
    assert torch.equal(local_phase, local)
    if world.size > 1:  # local steps really are local: period 3 differs from sync
        assert not torch.allclose(local, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy, sync", [
    ("bmuf", {"bmuf_momentum": 0.0, "bmuf_lr": 1.0}),
    ("bmuf", {"bmuf_momentum": 0.0, "bmuf_lr": 1.0, "bmuf_nesterov": False}),
    ("easgd", {"easgd_alpha": 1.0, "easgd_beta": 1.0}),
])
def test_reduces_to_model_averaging(world, shared_tmp, digits_h5, strategy, sync):
    _, avg = run(world, shared_tmp, digits_h5, "ls", "local_sgd", optim=SGD_M, sync={"period": 3})
    _, got = run(world, shared_tmp, digits_h5, strategy, strategy, optim=SGD_M, sync={"period": 3, **sync})
    torch.testing.assert_close(got, avg, rtol=1e-5, atol=1e-6)


def test_bmuf_block_momentum_changes_the_result(world, shared_tmp, digits_h5):
    if world.size == 1:  # default η = 1 - 1/N = 0: plain averaging of one model
        return
    _, avg = run(world, shared_tmp, digits_h5, "ls", "local_sgd", optim=SGD_M, sync={"period": 3})
    _, got = run(world, shared_tmp, digits_h5, "bmuf", "bmuf", optim=SGD_M, sync={"period": 3})
    assert not torch.allclose(got, avg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy, sync, optim", [
    ("local_sgd", {"period": 4}, {}),
    ("post_local_sgd", {"period": 4, "local_start": 50}, {}),
    ("bmuf", {"period": 4}, {"momentum": 0.0, "lr": 0.1}),
    ("easgd", {"period": 4}, {}),
    ("easgd_async", {"period": 4}, {}),
])
def test_reaches_95_percent_on_digits(world, shared_tmp, digits_h5, strategy, sync, optim):
    row, _ = run(world, shared_tmp, digits_h5, strategy, strategy, sync=sync,
                 model={"name": "cnn", "channels": [16, 32]},
                 optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "warmup_epochs": 1, **optim},
                 train={"batch_size": 16, "epochs": 8})
    assert row["test_acc"] >= 0.95, row
    assert row["comm_bytes_per_step"] > 0 or world.size == 1
