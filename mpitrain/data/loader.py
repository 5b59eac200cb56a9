"""A training split for your own loop (mpitrain.Loader), and batches onto the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import hdf5
from .sampler import DistributedSampler

if TYPE_CHECKING:
    from ..comm import World


def to_device(arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    """numpy arrays as tensors on `device`; to a GPU through pinned memory, asynchronously."""
    if device.type != "cuda":
        return tuple(torch.from_numpy(a) for a in arrays)
    return tuple(torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in arrays)


class Loader:
    """Collective to create: one split of an mpitrain HDF5 file, and per epoch the batches
    of this rank: every sample exactly once per epoch over all ranks, deterministic from
    (seed, epoch). `mode="partitioned"` reads only this rank's shard (collective mpio reads)
    and shuffles within it; "replicated" reads all and shuffles globally. Token streams
    need `seq_len` (windows of seq_len inputs and the next seq_len tokens as targets)."""

    def __init__(self, path: str, world: World, batch_size: int, *, split: str = "train", mode: str = "replicated",
                 seed: int = 0, device: str | torch.device = "cpu", seq_len: int = 0):
        from ..config import DataCfg, TrainCfg
        from ..options import build

        where = "mpitrain.Loader()"
        cfg = build(DataCfg, {"path": str(path), "mode": mode, "train": split, "test": "", "seq_len": seq_len},
                    where, "data")
        batch_size = build(TrainCfg, {"batch_size": batch_size, "seed": seed}, where, "train").batch_size
        self.data, _, self.meta = hdf5.load(cfg, world)
        self.device = torch.device(device)
        self.sampler = DistributedSampler(self.data.total, world.size, world.rank, batch_size, seed,
                                          "global" if mode == "replicated" else "shard")

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int):
        """(x, y) tensors for every step of `epoch` (the same number of steps on every rank;
        the last batches may be smaller or, on some ranks, empty)."""
        for batch in self.sampler.epoch(epoch):
            yield to_device(self.data.take(batch.indices), self.device)
