"""A measured cost model of a data-parallel step (no MPI here; `mpitrain bench model`
measures its inputs).

Transport: the alpha-beta model of Hockney, with the collective algorithms MPI uses for
large messages: a ring allreduce of B bytes on n ranks costs 2(n-1) alpha + 2(n-1)/n B
beta; an allgather of b bytes per rank (n-1) alpha + (n-1) b beta; an all-to-all of B
bytes per rank (n-1) alpha + (n-1)/n B beta. A step costs compute(batch), plus a
compressor's own arithmetic (measured alone: its encode and decode with no communication),
plus the communication the strategy issues per step (averaged over a period where it communicates
every H steps), minus what hides behind backward (`overlap`, the share measured by
train.trace; 0 without a communication thread).
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
    matrices: tuple[tuple[int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return 4 * self.params


def comm_seconds(strategy: str, model: Model, t: Transport, n: int, *, period: int = 4, ratio: float = 0.01,
                 rank: int = 2) -> float:
    """Communication per step of a strategy or compressor (see README's table)."""
    if strategy == "allreduce":
        return t.allreduce(model.nbytes, n)
    if strategy in ("fp16", "bf16"):
        return t.alltoall(2 * model.params, n) + t.allgather(2 * model.params / n, n)
    if strategy == "topk":
        return t.allgather(8 * round(ratio * model.params), n)
    if strategy == "sign":
        return t.allgather(model.params / 8 + 4, n)
    if strategy == "powersgd":
        small = model.params - sum(r * c for r, c in model.matrices)
        p = sum(r * min(rank, r, c) for r, c in model.matrices)
        q = sum(c * min(rank, r, c) for r, c in model.matrices)
        return t.allreduce(4 * (p + small), n) + t.allreduce(4 * q, n)
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
