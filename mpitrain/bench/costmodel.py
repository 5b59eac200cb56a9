"""A measured cost model of a data-parallel step (no MPI here; `mpitrain bench model`
measures its inputs).

Transport: the alpha-beta model of Hockney, with the collective algorithms MPI uses for
large messages: a ring allreduce of B bytes on n ranks costs 2(n-1) alpha + 2(n-1)/n B
beta; an allgather of b bytes per rank (n-1) alpha + (n-1) b beta; an all-to-all of B
bytes per rank (n-1) alpha + (n-1)/n B beta. A step costs compute(batch), plus a
compressor's own arithmetic (measured alone: its encode and decode with no communication),
plus the communication the strategy issues per step (averaged over a period where it communicates
every H steps), minus what hides behind backward (`overlap`, the share measured by
train.trace; 0 without a communication thread). A compressor's communication is what it
declares itself (`Compressor.wire`: collectives and bytes, in mpitrain/sync/compress),
turned into seconds here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transport:
    alpha: float  # seconds per message step (latency)
    beta: float  # seconds per byte (1 / bandwidth)

    def allreduce(self, nbytes: float, n: int) -> float:
        return 0.0 if n == 1 else 2 * (n - 1) * self.alpha + 2 * (n - 1) / n * nbytes * self.beta

    def allgather(self, nbytes_per_rank: float, n: int) -> float:
        return 0.0 if n == 1 else (n - 1) * self.alpha + (n - 1) * nbytes_per_rank * self.beta

    def alltoall(self, nbytes: float, n: int) -> float:
        return 0.0 if n == 1 else (n - 1) * self.alpha + (n - 1) / n * nbytes * self.beta

    @classmethod
    def fit(cls, sizes: list[float], seconds: list[float], n: int, latency: float | None = None) -> "Transport":
        """alpha from `latency` (the time of a tiny allreduce, 2(n-1) alpha) when given,
        else fitted; beta by least squares of t(B) - 2(n-1) alpha = 2(n-1)/n B beta."""
        b = np.array([2 * (n - 1) / n * x for x in sizes], dtype=float)
        t = np.asarray(seconds, dtype=float)
        if latency is None:
            a = np.stack([np.full_like(b, 2 * (n - 1)), b], axis=1)
            alpha = max(0.0, float(np.linalg.lstsq(a, t, rcond=None)[0][0]))
        else:
            alpha = latency / (2 * (n - 1))
        beta = float(np.dot(b, t - 2 * (n - 1) * alpha) / np.dot(b, b))
        return cls(alpha, max(0.0, beta))


@dataclass(frozen=True)
class Model:
    """What a step moves: `params` float32 values, of which `matrices` (rows, cols) are
    the weight matrices PowerSGD compresses (the rest goes in full)."""

    params: int
    matrices: tuple[tuple[int, int], ...] = ()  # (rows, cols) of the parameters with >= 2 dims

    @property
    def nbytes(self) -> int:
        return 4 * self.params


def wire_seconds(wire, t: Transport, n: int) -> float:
    """Seconds of declared traffic: (collective, bytes this rank hands to MPI) pairs, the
    collective "allreduce" (the buffer), "allgather" (this rank's part) or "alltoall"
    (this rank's whole send buffer)."""
    calls = {"allreduce": t.allreduce, "allgather": t.allgather, "alltoall": t.alltoall}
    return sum(calls[kind](nbytes, n) for kind, nbytes in wire)


def comm_seconds(strategy: str, model: Model, t: Transport, n: int, *, period: int = 4, wire=None) -> float:
    """Communication per step of a strategy (see README's table); with a compressor
    (allreduce), what its `wire` declares instead of the dense allreduce."""
    if wire is not None:
        return wire_seconds(wire, t, n)
    if strategy in ("allreduce", "zero"):  # zero: a reduce-scatter and an allgather, the ring's two halves
        return t.allreduce(model.nbytes, n)
    if strategy in ("local_sgd", "bmuf", "easgd"):
        return t.allreduce(model.nbytes, n) / period
    raise ValueError(f"no cost model for {strategy!r}")


def step_seconds(strategy: str, model: Model, t: Transport, n: int, compute: float, overlap: float = 0.0,
                 codec: float = 0.0, **kw) -> float:
    """compute + a compressor's own arithmetic (`codec`, measured: encode and decode) + the
    communication that does not hide behind backward."""
    return compute + codec + (1.0 - overlap) * comm_seconds(strategy, model, t, n, **kw)


def matrices_of(module) -> tuple[tuple[int, int], ...]:
    """The (rows, cols) of a torch module's weight matrices (parameters with >= 2 dims)."""
    return tuple((p.shape[0], p.numel() // p.shape[0]) for p in module.parameters() if p.ndim >= 2)
