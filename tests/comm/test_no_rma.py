"""Where one-sided MPI does not work between nodes (Open MPI 4.x over TCP: osc/rdma needs
RDMA, osc/pt2pt refuses MPI_THREAD_MULTIPLE), training with collectives still runs and the
window-based strategies fail with one agreed line."""

import pytest
from mpi4py import MPI

from mpitrain.comm import heartbeat, rma
from mpitrain.errors import AgreedError

pytestmark = pytest.mark.mpi


@pytest.fixture
def no_windows(world, monkeypatch):
    """Win.Allocate fails with MPI_ERR_WIN on every rank, as Open MPI 4.1's osc selection
    does across TCP-only nodes."""
    def allocate(*args):
        raise MPI.Exception(MPI.ERR_WIN)
    monkeypatch.setattr(rma, "_win_allocate", allocate)


def test_window_failure_is_agreed(world, no_windows):
    comm = world.comm.Dup()
    with pytest.raises(AgreedError, match="one-sided MPI \\(RMA windows\\) does not work"):
        rma.allocate(comm, 64, 8)
    assert heartbeat.Heartbeat.create(world) is None  # every rank: no heartbeat, no hang


def test_training_runs_without_windows_and_store_strategies_say_why(world, run_digits, no_windows):
    row, _ = run_digits("plain", "allreduce")
    assert row["step"] == 10
    with pytest.raises(AgreedError, match="use sync.strategy = allreduce or a local strategy"):
        run_digits("ps", "ps_sync")
