"""Parameter-server strategies: equivalences, staleness bound, accuracy, termination."""

import pytest
import torch

pytestmark = pytest.mark.mpi


def test_ps_sync_equals_allreduce(run_digits):
    _, ref = run_digits("ar", "allreduce")
    _, ps = run_digits("ps", "ps_sync")
    # same optimizer on the same mean gradients; only the summation order differs
    torch.testing.assert_close(ps, ref, rtol=1e-5, atol=1e-6)


def test_ps_sync_equals_allreduce_with_adam(run_digits):
    opt = {"name": "adam", "lr": 0.003}
    _, ref = run_digits("ar", "allreduce", optim=opt)
    _, ps = run_digits("ps", "ps_sync", optim=opt)
    torch.testing.assert_close(ps, ref, rtol=1e-4, atol=1e-5)


def test_ssp_with_zero_staleness_is_ps_sync(world, run_digits):
    row, ssp = run_digits("ssp", "ssp", {"staleness": 0},
                          train={"batch_size": 8, "max_steps": 10, "epochs": 2, "slowdown_rank": world.size - 1,
                                 "slowdown_factor": 3.0})
    _, ps = run_digits("ps", "ps_sync")
    torch.testing.assert_close(ssp, ps, rtol=1e-5, atol=1e-6)
    assert row["staleness_max"] == 0


def test_ssp_staleness_bound_with_a_straggler(world, run_digits):
    s = 2
    row, _ = run_digits("ssp", "ssp", {"staleness": s},
                        train={"batch_size": 8, "max_steps": 30, "epochs": 1, "slowdown_rank": world.size - 1,
                               "slowdown_factor": 4.0})
    worst = world.allgather(row["staleness_max"])
    assert max(worst) <= s
    if world.size > 1:  # with a straggler, some reads of the fast ranks are stale
        assert max(worst) > 0


# Stale reads act like extra momentum (Mitliagkas et al. 2016), so ssp gets less of it.
@pytest.mark.parametrize("strategy, options, momentum, epochs", [
    ("async", {}, 0.9, 8), ("async", {"dc_lambda": 0.04}, 0.9, 8), ("ssp", {"staleness": 2}, 0.8, 12)])
def test_reaches_95_percent_on_digits(world, run_digits, strategy, options, momentum, epochs):
    row, _ = run_digits(strategy, strategy, options,
                        model={"name": "cnn", "channels": [16, 32]},
                        optim={"name": "sgd", "lr": 0.05, "momentum": momentum, "warmup_epochs": 1},
                        train={"batch_size": 16, "epochs": epochs})
    assert row["test_acc"] >= 0.95, row
    assert row["comm_bytes_per_step"] > 0, row  # measured: pushes, pulls and store-side updates


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("strategy", ["ps_sync", "ssp", "async"])
def test_dedicated_servers(world, run_digits, servers, strategy):
    """The last `servers` ranks only host the store; ps_sync then equals allreduce among
    the workers. Needs at least one worker: with fewer ranks it is a clear error."""
    from mpitrain.errors import AgreedError

    if world.size <= servers:
        with pytest.raises(AgreedError, match="leaves no worker"):
            run_digits("ded", strategy, {"servers": servers})
        return
    row, got = run_digits("ded", strategy, {"servers": servers})
    is_server = world.rank >= world.size - servers
    workers = world.split(1 if is_server else 0)
    workers.parent = None  # the reference runs on the workers alone
    if not is_server:
        assert row["step"] == 10 and "test_acc" in row
        if strategy == "ps_sync":
            _, ref = run_digits("ref", "allreduce", world=workers)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    else:
        assert row == {} and got is None
    workers.free()
    world.barrier()


def test_async_dynamic_batches_with_a_straggler_terminate(world, run_digits):
    """Ranks run different numbers of steps (fast ones take more batches) and still end
    each epoch together, checkpoint and finish cleanly."""
    row, _ = run_digits("dyn", "async",
                        data={"mode": "replicated", "assign": "dynamic"},
                        train={"batch_size": 8, "epochs": 2, "slowdown_rank": world.size - 1,
                               "slowdown_factor": 3.0})
    steps = world.allgather(row["step"])
    assert sum(steps) == 2 * -(-1438 // 8)  # every global batch of both epochs taken exactly once
    assert row["test_acc"] > 0.5
