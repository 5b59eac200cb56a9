"""The cost model's formulas and its fit (no MPI calls), with the compressors' declared wire."""

import pytest

from mpitrain.bench import costmodel
from mpitrain.sync.compress import REGISTRY


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

    def wire(kind, **options):  # what the compressor declares for the model as one bucket
        cls = REGISTRY[kind]
        return cls.wire(m.params, m.matrices, 4, cls.Options(**options))

    def comm(kind, **options):
        return costmodel.comm_seconds("allreduce", m, t, 4, wire=wire(kind, **options))
    assert comm("fp16") == pytest.approx((0.75 * 2e6 + 3 * 2e6 / 4) * 1e-9)
    assert comm("topk", ratio=0.01) == pytest.approx(3 * 8e4 * 1e-9)
    assert comm("topk", ratio=0.01, payload="bf16") == pytest.approx(3 * 6e4 * 1e-9)  # int32 index + 2 bytes
    assert comm("sign") == pytest.approx(3 * (1e6 / 8 + 4) * 1e-9)
    # rank 2: the 100,000 values outside the matrix in full, P (1000 x 2), Q (900 x 2): three sums
    assert comm("powersgd", rank=2, min_numel=0) == pytest.approx(1.5 * 4 * (100_000 + 2000 + 1800) * 1e-9)
    assert wire("powersgd", rank=2, min_numel=0) == [("allreduce", 4 * 100_000), ("allreduce", 4 * 2000),
                                                      ("allreduce", 4 * 1800)]
    # a bf16 payload: each sum an all-to-all of 2-byte chunks and an allgather of 2-byte sums
    assert wire("powersgd", rank=2, min_numel=0, payload="bf16")[2:4] == [("alltoall", 2 * 2000),
                                                                           ("allgather", 2 * 500)]
    assert wire("powersgd", min_numel=10**6) == [("allreduce", 4e6)]  # nothing large enough: one plain sum
    assert costmodel.step_seconds("allreduce", m, t, 4, compute=0.01, overlap=0.5) == pytest.approx(0.01 + full / 2)
