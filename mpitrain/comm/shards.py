"""Contiguous shards of a range over ranks (no MPI here)."""

from __future__ import annotations


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous block of np.array_split(range(n), size)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
