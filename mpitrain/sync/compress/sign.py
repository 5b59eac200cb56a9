"""EF-signSGD (Karimireddy et al. 2019): the signs of gradient + residual as packed bits
(1/32 of float32) times this rank's mean |value|, with error feedback; decoded one rank's
bits at a time (no ranks x values temporaries)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import Compressor, register


@dataclass(frozen=True)
class SignOptions:
    """sign takes no keys besides `kind` (its payload is one bit per value)."""


@register("sign")
class Sign(Compressor):
    Options = SignOptions
    bench = ("sign", {})

    def __init__(self, options, buf, layout, world):
        super().__init__(options, buf, layout, world)
        self.residual = torch.zeros_like(buf)
        self.own = {"residual": self.residual}

    def reduce_(self, buf, step):
        acc = buf + self.residual
        scale = acc.abs().mean()
        positive = acc >= 0
        self.residual.copy_(acc - torch.where(positive, scale, -scale))
        bits = torch.from_numpy(np.packbits(positive.cpu().numpy()))
        all_bits = self.world.allgather_tensor(bits).cpu().numpy()
        scales = self.world.allgather_tensor(scale.reshape(1).float()).reshape(-1).tolist()
        # sum_i s_i (2 b_i - 1) = sum_i 2 s_i b_i - sum_i s_i, one rank's bits at a time
        buf.fill_(-sum(scales))
        for s, row in zip(scales, all_bits):
            b = torch.from_numpy(np.unpackbits(row, count=buf.numel())).to(buf.device, buf.dtype)
            buf.add_(b, alpha=2 * s)

    @classmethod
    def wire(cls, numel, matrices, world_size, options):
        return [("allgather", math.ceil(numel / 8)), ("allgather", 4)]
