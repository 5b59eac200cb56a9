"""Distributed sampler: every sample exactly once per epoch across ranks.

Deterministic from (seed, epoch); resumable mid-epoch. Three shuffles (data.shuffle):

- "global" (replicated data): one permutation of all N samples per epoch; step s takes the
  global batch perm[s*G:(s+1)*G] with G = batch_size * world size, split evenly over the
  ranks. The global batches do not depend on the world size, so N ranks with batch B see
  exactly what 1 process with batch N*B sees.
- "shard" (partitioned data): rank r owns the contiguous block r of
  np.array_split(range(N), size) and permutes it per epoch with seed (seed, epoch, r).
- "none": like "global" without shuffling.

`DynamicSampler` (data.assign = "dynamic", for async training on replicated data): the
global batches of the "global" shuffle are handed out first come, first served through an
atomic counter, so a fast worker takes more of them than a straggler; still every sample
exactly once per epoch, but which rank gets what depends on timing.

Uneven sizes: every rank runs the same number of steps, ceil(N / G) for global/none and
ceil(largest block / B) for shard; the last batches are smaller and may be empty on some
ranks. `global_count` (the samples in the step over all ranks) lets the loss be scaled so
gradients are exact means over the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..comm import shard_bounds


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # global sample indices for this rank (may be empty)
    global_count: int    # samples in this step over all ranks


class DistributedSampler:
    lockstep = True  # every rank runs the same steps

    def __init__(self, n: int, size: int, rank: int, batch_size: int, seed: int, shuffle: str):
        if shuffle not in ("global", "shard", "none"):
            raise ValueError(f"unknown shuffle {shuffle!r}")
        self.n, self.size, self.rank, self.batch, self.seed, self.shuffle = n, size, rank, batch_size, seed, shuffle
        self.lens = [shard_bounds(n, size, r)[1] - shard_bounds(n, size, r)[0] for r in range(size)]

    @property
    def steps_per_epoch(self) -> int:
        if self.shuffle == "shard":
            return math.ceil(max(self.lens) / self.batch)
        return math.ceil(self.n / (self.batch * self.size))

    def _perm(self, epoch: int) -> np.ndarray:
        if self.shuffle == "none":
            return np.arange(self.n)
        if self.shuffle == "global":
            return np.random.default_rng([self.seed, epoch]).permutation(self.n)
        lo, hi = shard_bounds(self.n, self.size, self.rank)
        return lo + np.random.default_rng([self.seed, epoch, self.rank]).permutation(hi - lo)

    def epoch(self, epoch: int, start_sample: int = 0):
        """Yield the Batch of each step of `epoch`, after `start_sample` global samples
        (resume). That is exact for the global/none shuffles at any world size: the rest of
        the epoch's permutation is cut into batches of the new size. For the shard shuffle it
        is exact at the same world size, else the nearest step (shards change)."""
        perm, B, S = self._perm(epoch), self.batch, self.size
        start_step = 0
        if self.shuffle == "shard":
            start_step = min(self.steps_per_epoch, round(start_sample / (B * S)))
        else:
            perm = perm[start_sample:]
        for s in range(start_step, math.ceil(len(perm) / (B * S)) if self.shuffle != "shard"
                       else self.steps_per_epoch):
            if self.shuffle == "shard":
                idx = perm[s * B:(s + 1) * B]
                count = sum(min(max(ln - s * B, 0), B) for ln in self.lens)
            else:
                gb = perm[s * B * S:(s + 1) * B * S]
                lo, hi = shard_bounds(len(gb), S, self.rank)
                idx, count = gb[lo:hi], len(gb)
            yield Batch(idx, count)


class DynamicSampler:
    """Collective to create and to `close`: global batches of `batch_size` claimed first
    come, first served through one shared counter (World.counter, an RMA window on rank
    0), numbered across epochs. A rank that claims a batch of the next epoch ends its epoch
    and starts the next one with that batch. Ranks run different numbers of steps."""

    lockstep = False

    def __init__(self, world, n: int, batch_size: int, seed: int):
        self.world, self.n, self.batch, self.seed = world, n, batch_size, seed
        self.batches_per_epoch = math.ceil(n / batch_size)  # over all ranks together
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / world.size)  # expected per rank (LR schedule)
        self.counter = None
        self._claimed = None  # a claim of a later epoch, kept for it

    def epoch(self, epoch: int, start_sample: int = 0):
        if start_sample:
            raise ValueError("data.assign = 'dynamic' resumes at epoch boundaries only")
        if self.counter is None:  # collective: every rank starts the same epoch
            self.counter = self.world.counter(start=epoch * self.batches_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        while True:
            v, self._claimed = (self._claimed if self._claimed is not None else self.counter.next()), None
            e, b = divmod(v, self.batches_per_epoch)
            if e != epoch:
                self._claimed = v
                return
            yield Batch(perm[b * self.batch:(b + 1) * self.batch], self.batch * self.world.size)

    def close(self):
        """Collective."""
        if self.counter is not None:
            self.counter.free()
            self.counter = None
