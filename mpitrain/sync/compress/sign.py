"""EF-signSGD (Karimireddy et al. 2019): the signs of gradient + residual as packed bits
(1/32 of float32) times this rank's mean |value|, with error feedback; decoded one rank's
bits at a time (no ranks x values temporaries). Bits are packed and unpacked with torch
ops on the gradient's own device, in np.packbits's format (the first value in a byte's
most significant bit, the last byte padded with zeros)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Compressor, register

_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)  # value j of a byte is bit 7 - j (np.packbits, bitorder="big")


def _weights(device: torch.device) -> torch.Tensor:
    """The bit weights 128, 64, ..., 1 as uint8 on `device`."""
    return torch.tensor([1 << s for s in _SHIFTS], dtype=torch.uint8, device=device)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor's values as ceil(n / 8) uint8 bytes on its device, as np.packbits packs them."""
    n = flags.numel()
    bits = torch.zeros(8 * math.ceil(n / 8), dtype=torch.uint8, device=flags.device)
    bits[:n] = flags.reshape(-1)
    return (bits.view(-1, 8) * _weights(flags.device)).sum(1, dtype=torch.uint8)  # distinct bits: no carry


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of uint8 bytes as 0/1 uint8 values on their device (np.unpackbits)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:count]


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
        all_bits = self.world.allgather_tensor(pack_bits(positive))  # (ranks, bytes) on buf's device
        scales = self.world.allgather_tensor(scale.reshape(1).float()).reshape(-1).tolist()
        # sum_i s_i (2 b_i - 1) = sum_i 2 s_i b_i - sum_i s_i, one rank's bits at a time
        buf.fill_(-sum(scales))
        for s, row in zip(scales, all_bits):
            buf.add_(unpack_bits(row, buf.numel()).to(buf.dtype), alpha=2 * s)

    @classmethod
    def wire(cls, numel, matrices, world_size, options):
        return [("allgather", math.ceil(numel / 8)), ("allgather", 4)]
