"""A training split for your own loop (mpitrain.Loader), and batches onto the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError
from . import hdf5
from .sampler import DistributedSampler

if TYPE_CHECKING:
    from ..comm import World


def pinned(a: np.ndarray, pin: bool = True) -> torch.Tensor:
    """A contiguous (pinned) host copy of an array, made in one copy: views such as a token
    batch's shifted windows too, so the upload from it is asynchronous."""
    src = torch.from_numpy(a)
    return torch.empty(src.shape, dtype=src.dtype, pin_memory=pin).copy_(src)


def to_device(arrays, device: torch.device) -> tuple[torch.Tensor, ...]:
    """numpy arrays as tensors on `device`; to a GPU through pinned memory, asynchronously."""
    if device.type != "cuda":
        return tuple(torch.from_numpy(a) for a in arrays)
    return tuple(pinned(a).to(device, non_blocking=True) for a in arrays)


def rank_device(device: str | torch.device, world: World) -> torch.device:
    """`device` for this rank: "cuda" without an index is this rank's GPU, as
    World.select_device picks it (local rank % GPUs on the node)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    if not torch.cuda.is_available():
        raise UserError("mpitrain.Loader(): device = 'cuda' but torch sees no CUDA device")
    return torch.device("cuda", world.local_rank % torch.cuda.device_count())


class Loader:
    """Collective to create: one split of an mpitrain HDF5 file, and per epoch the batches
    of this rank: every sample exactly once per epoch over all ranks, deterministic from
    (seed, epoch). `mode="partitioned"` reads only this rank's shard (collective mpio reads)
    and shuffles within it; "replicated" reads all and shuffles globally. Token streams
    need `seq_len` (windows of seq_len inputs and the next seq_len tokens as targets).
    `device="cuda"` is this rank's GPU (rank_device)."""

    def __init__(self, path: str, world: World, batch_size: int, *, split: str = "train", mode: str = "replicated",
                 seed: int = 0, device: str | torch.device = "cpu", seq_len: int = 0):
        from ..config import DataCfg, TrainCfg
        from ..options import build

        where = "mpitrain.Loader()"
        self.device = world.agree(rank_device, device, world)  # before the collective reads
        cfg = build(DataCfg, {"path": str(path), "mode": mode, "train": split, "test": "", "seq_len": seq_len},
                    where, "data")
        batch_size = build(TrainCfg, {"batch_size": batch_size, "seed": seed}, where, "train").batch_size
        self.data, _, self.meta = hdf5.load(cfg, world)
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
