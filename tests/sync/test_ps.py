"""Parameter-server strategies: equivalences, staleness bound, accuracy, termination."""

import pytest
import torch

from mpitrain.train import train

from conftest import make_cfg

pytestmark = pytest.mark.mpi


def run(world, shared_tmp, digits_h5, name, strategy, **sections):
    sections.setdefault("model", {"name": "mlp", "hidden": [32]})
    sections.setdefault("optim", {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4})
    sections.setdefault("train", {"batch_size": 8, "max_steps": 10, "epochs": 2})
    sections["sync"] = {"strategy": strategy, **sections.get("sync", {})}
    cfg = make_cfg(shared_tmp / name, digits_h5, **sections)
    row, model = train(cfg, world, world.logger())
    if model is None:  # a dedicated server rank
        return row, None
    return row, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_ps_sync_equals_allreduce(world, shared_tmp, digits_h5):
    _, ref = run(world, shared_tmp, digits_h5, "ar", "allreduce")
    _, ps = run(world, shared_tmp, digits_h5, "ps", "ps_sync")
    # same optimizer on the same mean gradients; only the summation order differs
    torch.testing.assert_close(ps, ref, rtol=1e-5, atol=1e-6)


def test_ps_sync_equals_allreduce_with_adam(world, shared_tmp, digits_h5):
    opt = {"name": "adam", "lr": 0.003}
    _, ref = run(world, shared_tmp, digits_h5, "ar", "allreduce", optim=opt)
    _, ps = run(world, shared_tmp, digits_h5, "ps", "ps_sync", optim=opt)
    torch.testing.assert_close(ps, ref, rtol=1e-4, atol=1e-5)


def test_ssp_with_zero_staleness_is_ps_sync(world, shared_tmp, digits_h5):
    row, ssp = run(world, shared_tmp, digits_h5, "ssp", "ssp", sync={"staleness": 0},
                   train={"batch_size": 8, "max_steps": 10, "epochs": 2, "slowdown_rank": world.size - 1,
                          "slowdown_factor": 3.0})
    _, ps = run(world, shared_tmp, digits_h5, "ps", "ps_sync")
    torch.testing.assert_close(ssp, ps, rtol=1e-5, atol=1e-6)
    assert row["staleness_max"] == 0


def test_ssp_staleness_bound_with_a_straggler(world, shared_tmp, digits_h5):
    s = 2
    row, _ = run(world, shared_tmp, digits_h5, "ssp", "ssp", sync={"staleness": s},
                 train={"batch_size": 8, "max_steps": 30, "epochs": 1, "slowdown_rank": world.size - 1,
                        "slowdown_factor": 4.0})
    worst = world.comm.allgather(row["staleness_max"])
    assert max(worst) <= s
    if world.size > 1:  # with a straggler, some reads of the fast ranks are stale
        assert max(worst) > 0


# Stale reads act like extra momentum (Mitliagkas et al. 2016), so ssp gets less of it.
@pytest.mark.parametrize("strategy, sync, momentum, epochs", [
    ("async", {}, 0.9, 8), ("async", {"dc_lambda": 0.04}, 0.9, 8), ("ssp", {"staleness": 2}, 0.8, 12)])
def test_reaches_95_percent_on_digits(world, shared_tmp, digits_h5, strategy, sync, momentum, epochs):
    row, _ = run(world, shared_tmp, digits_h5, strategy, strategy, sync=sync,
                 model={"name": "cnn", "channels": [16, 32]},
                 optim={"name": "sgd", "lr": 0.05, "momentum": momentum, "warmup_epochs": 1},
                 train={"batch_size": 16, "epochs": epochs})
    assert row["test_acc"] >= 0.95, row


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("strategy", ["ps_sync", "ssp", "async"])
def test_dedicated_servers(world, shared_tmp, digits_h5, servers, strategy):
    """The last `servers` ranks only host the store; ps_sync then equals allreduce among
    the workers. Needs at least one worker: with fewer ranks it is a clear error."""
    from mpitrain.errors import AgreedError

    if world.size <= servers:
        with pytest.raises(AgreedError, match="leaves no worker"):
            run(world, shared_tmp, digits_h5, "ded", strategy, sync={"servers": servers})
        return
    row, got = run(world, shared_tmp, digits_h5, "ded", strategy, sync={"servers": servers})
    is_server = world.rank >= world.size - servers
    workers = world.split(1 if is_server else 0)
    workers.parent = None  # the reference runs on the workers alone
    if not is_server:
        assert row["step"] == 10 and "test_acc" in row
        if strategy == "ps_sync":
            _, ref = run(workers, shared_tmp, digits_h5, "ref", "allreduce")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    else:
        assert row == {} and got is None
    workers.comm.Free()
    world.comm.Barrier()


def test_async_dynamic_batches_with_a_straggler_terminate(world, shared_tmp, digits_h5):
    """Ranks run different numbers of steps (fast ones take more batches) and still end
    each epoch together, checkpoint and finish cleanly."""
    row, _ = run(world, shared_tmp, digits_h5, "dyn", "async",
                 data={"mode": "replicated", "assign": "dynamic"},
                 train={"batch_size": 8, "epochs": 2, "slowdown_rank": world.size - 1, "slowdown_factor": 3.0})
    steps = world.comm.allgather(row["step"])
    assert sum(steps) == 2 * -(-1438 // 8)  # every global batch of both epochs taken exactly once
    assert row["test_acc"] > 0.5
