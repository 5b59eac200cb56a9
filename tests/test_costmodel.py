"""The cost model's formulas and its fit (no MPI)."""

import pytest

from mpitrain import costmodel


def test_ring_formulas():
    t = costmodel.Transport(alpha=1e-5, beta=1e-9)
    assert t.allreduce(1e6, 4) == pytest.approx(6e-5 + 1.5e-3)
    assert t.allgather(1e3, 4) == pytest.approx(3e-5 + 3e-6)
    assert t.alltoall(1e6, 4) == pytest.approx(3e-5 + 0.75e-3)
    assert t.allreduce(1e6, 1) == 0


def test_fit_recovers_alpha_and_beta():
    true = costmodel.Transport(alpha=2e-5, beta=3e-10)
    sizes = [2**k for k in range(12, 26, 2)]
    times = [true.allreduce(b, 4) for b in sizes]
    got = costmodel.Transport.fit(sizes, times, 4)
    assert got.alpha == pytest.approx(2e-5, rel=1e-6) and got.beta == pytest.approx(3e-10, rel=1e-6)
    got = costmodel.Transport.fit(sizes, times, 4, latency=true.allreduce(0, 4))
    assert got.alpha == pytest.approx(2e-5) and got.beta == pytest.approx(3e-10, rel=1e-6)


def test_strategies_move_what_the_readme_says():
    t = costmodel.Transport(alpha=0.0, beta=1e-9)
    m = costmodel.Model(params=1_000_000, matrices=((1000, 900),))
    full = costmodel.comm_seconds("allreduce", m, t, 4)
    assert full == pytest.approx(1.5 * 4e6 * 1e-9)
    assert costmodel.comm_seconds("local_sgd", m, t, 4, period=4) == pytest.approx(full / 4)
    assert costmodel.comm_seconds("fp16", m, t, 4) == pytest.approx((0.75 * 2e6 + 3 * 2e6 / 4) * 1e-9)
    assert costmodel.comm_seconds("topk", m, t, 4, ratio=0.01) == pytest.approx(3 * 8e4 * 1e-9)
    # rank 2: P (1000 x 2) and Q (900 x 2), plus the 100,000 values outside the matrix in full
    assert costmodel.comm_seconds("powersgd", m, t, 4, rank=2) == pytest.approx(1.5 * 4 * (2000 + 100_000 + 1800) * 1e-9)
    assert costmodel.step_seconds("allreduce", m, t, 4, compute=0.01, overlap=0.5) == pytest.approx(0.01 + full / 2)
