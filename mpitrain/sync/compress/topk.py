"""Top-k with error feedback: the k = ratio x numel largest |values| of gradient + residual
(per bucket), their indices (int32; int64 for buckets of 2^31 values or more) and values
allgathered and summed in float32 one rank at a time, in rank order (a rank's indices are
distinct, so no two additions meet in one call: the same sum on every rank and every
device, where one index_add_ over all ranks' indices adds duplicates with atomics in
whatever order a GPU runs them); what was not sent, and the payload's rounding of what was,
stays in this rank's residual."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...options import opt
from .base import PAYLOAD_BYTES, Compressor, payload_opt, register
from .half import HALF, agreed_scale


@dataclass(frozen=True)
class TopKOptions:
    ratio: float = opt(0.01, gt=0.0, max=1.0, help="fraction of each bucket's values sent (at least one)")
    payload: str = payload_opt("the values sent (indices are int32, int64 from 2^31 values)")


def _k(numel: int, ratio: float) -> int:
    return max(1, int(round(ratio * numel)))


def _index_bytes(numel: int) -> int:
    return 4 if numel < 2**31 else 8


@register("topk")
class TopK(Compressor):
    Options = TopKOptions
    bench = ("topk 1%", {"ratio": 0.01})

    def __init__(self, options, buf, layout, world):
        super().__init__(options, buf, layout, world)
        self.k = _k(buf.numel(), options.ratio)
        self.residual = torch.zeros_like(buf)
        self.own = {"residual": self.residual}

    def reduce_(self, buf, step):
        acc = buf + self.residual
        idx = acc.abs().topk(self.k, sorted=False).indices
        vals = acc[idx]
        dtype = HALF.get(self.options.payload)
        if dtype is None:
            sent, scale = vals, 1.0
            self.residual.copy_(acc).index_fill_(0, idx, 0.0)  # exactly what was not sent
        else:
            scale = agreed_scale(self.world, vals, dtype, 1)
            sent = (vals * scale).to(dtype)
            self.residual.copy_(acc).index_put_((idx,), vals - sent.to(vals.dtype) / scale)  # + the rounding
        wide = torch.int32 if _index_bytes(buf.numel()) == 4 else torch.int64
        all_idx = self.world.allgather_tensor(idx.to(wide)).long()  # (ranks, k)
        all_vals = self.world.allgather_tensor(sent).to(buf.dtype)
        if dtype is not None:
            all_vals /= scale
        buf.zero_()
        for rank_idx, rank_vals in zip(all_idx, all_vals):  # rank order: one deterministic sum
            buf.index_add_(0, rank_idx, rank_vals)

    @classmethod
    def wire(cls, numel, matrices, world_size, options):
        k = _k(numel, options.ratio)
        return [("allgather", _index_bytes(numel) * k), ("allgather", PAYLOAD_BYTES[options.payload] * k)]
