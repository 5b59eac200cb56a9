"""Local-update strategies (local SGD, post-local SGD, BMUF, EASGD): equivalences and accuracy."""

import pytest
import torch

pytestmark = pytest.mark.mpi
SGD_M = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}


def test_local_sgd_every_step_is_allreduce(run_digits):
    """Momentum buffers stay local, yet H = 1 is exact: momentum is linear, so the mean
    of the local buffers is the buffer of the mean gradient."""
    _, ref = run_digits("ar", "allreduce", optim=SGD_M)
    _, got = run_digits("ls", "local_sgd", {"period": 1}, optim=SGD_M)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_post_local_sgd_phases(world, run_digits):
    _, ref = run_digits("ar", "allreduce", optim=SGD_M)
    _, sync_phase = run_digits("pl", "post_local_sgd", {"local_start": 1000, "period": 3}, optim=SGD_M)
    torch.testing.assert_close(sync_phase, ref, rtol=1e-5, atol=1e-6)
    _, local = run_digits("ls", "local_sgd", {"period": 3}, optim=SGD_M)
    _, local_phase = run_digits("pl", "post_local_sgd", {"local_start": 0, "period": 3}, optim=SGD_M)
    assert torch.equal(local_phase, local)
    if world.size > 1:  # local steps really are local: period 3 differs from sync
        assert not torch.allclose(local, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy, options", [
    ("bmuf", {"momentum": 0.0, "lr": 1.0}),
    ("bmuf", {"momentum": 0.0, "lr": 1.0, "nesterov": False}),
    ("easgd", {"alpha": 1.0, "beta": 1.0}),
])
def test_reduces_to_model_averaging(run_digits, strategy, options):
    _, avg = run_digits("ls", "local_sgd", {"period": 3}, optim=SGD_M)
    _, got = run_digits(strategy, strategy, {"period": 3, **options}, optim=SGD_M)
    torch.testing.assert_close(got, avg, rtol=1e-5, atol=1e-6)


def test_bmuf_block_momentum_changes_the_result(world, run_digits):
    if world.size == 1:  # default η = 1 - 1/N = 0: plain averaging of one model
        return
    _, avg = run_digits("ls", "local_sgd", {"period": 3}, optim=SGD_M)
    _, got = run_digits("bmuf", "bmuf", {"period": 3}, optim=SGD_M)
    assert not torch.allclose(got, avg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy, options, optim", [
    ("local_sgd", {"period": 4}, {}),
    ("post_local_sgd", {"period": 4, "local_start": 50}, {}),
    ("bmuf", {"period": 4}, {"momentum": 0.0, "lr": 0.1}),
    ("easgd", {"period": 4}, {}),
    ("easgd_async", {"period": 4}, {}),
])
def test_reaches_95_percent_on_digits(world, run_digits, strategy, options, optim):
    row, _ = run_digits(strategy, strategy, options,
                        model={"name": "cnn", "channels": [16, 32]},
                        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "warmup_epochs": 1, **optim},
                        train={"batch_size": 16, "epochs": 8})
    assert row["test_acc"] >= 0.95, row
    assert row["comm_bytes_per_step"] > 0 or world.size == 1
