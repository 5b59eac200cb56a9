"""fp16 / bf16: 2-byte payloads, sums in float32 — an all-to-all of chunks (each rank sums
one chunk of every rank's buffer in float32), then an allgather of the 2-byte sums; every
rank ends with the same bytes. MPI never reduces a half type (Open MPI has no fp16 op and
sums bf16 as another type), so this is also how the other compressors sum a half
`payload` (`sum_`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import PAYLOAD_BYTES, Compressor, Wire, register

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def agreed_scale(world, x: torch.Tensor, dtype: torch.dtype, terms: int) -> float:
    """Collective for fp16 (max 65504): a power-of-two scale, the same on every rank, so
    that `terms` values as large as the largest |x| over ranks fit and small values keep
    their digits; 1.0 for bf16 (float32's range)."""
    if dtype != torch.float16:
        return 1.0
    top = world.max(float(x.abs().max()) if x.numel() else 0.0)
    if 0 < top < float("inf"):
        return 2.0 ** math.floor(math.log2(30000.0 / (terms * top)))
    return 1.0


def half_reduce_scatter(world, buf: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Collective: (this rank's chunk of the sum over ranks, scaled, in float32; the scale):
    buf in `size` chunks of ceil(numel / size) values (the last ones short or empty: see
    `chunk_counts`), each rank's sent as `dtype` to its owner (one alltoall) and summed
    there in float32."""
    n, numel = world.size, buf.numel()
    scale = agreed_scale(world, buf, dtype, n)
    chunk = math.ceil(numel / n)
    padded = torch.zeros(n * chunk, dtype=dtype, device=buf.device)
    padded[:numel] = buf * scale
    return world.alltoall_tensor(padded.view(n, chunk)).float().sum(0), scale


def chunk_counts(numel: int, size: int) -> list[int]:
    """Values of each rank's chunk in `half_reduce_scatter` (ceil(numel / size) each, the
    last ones short or empty)."""
    chunk = math.ceil(numel / size)
    return [max(0, min(chunk, numel - r * chunk)) for r in range(size)]


def half_sum_(world, buf: torch.Tensor, dtype: torch.dtype) -> None:
    """Collective: buf := the sum over ranks, sent as `dtype` and summed in float32."""
    mine, scale = half_reduce_scatter(world, buf, dtype)  # my chunk, float32 sums
    full = world.allgather_tensor(mine.to(dtype)).reshape(-1)[:buf.numel()]
    buf.copy_(full.float() / scale)


def sum_(world, buf: torch.Tensor, payload: str) -> None:
    """Collective: buf := the sum over ranks, on the wire as `payload` ("fp32": one allreduce)."""
    if payload == "fp32":
        world.allreduce_(buf)
    else:
        half_sum_(world, buf, HALF[payload])


def sum_wire(numel: int, world_size: int, payload: str) -> Wire:
    """What `sum_` sends for `numel` values."""
    if payload == "fp32":
        return [("allreduce", 4 * numel)]
    chunk, nbytes = math.ceil(numel / world_size), PAYLOAD_BYTES[payload]
    return [("alltoall", nbytes * world_size * chunk), ("allgather", nbytes * chunk)]


@dataclass(frozen=True)
class HalfOptions:
    """fp16 / bf16 take no keys besides `kind`."""


class Half(Compressor):
    """Stateless: the bucket summed with a 2-byte payload (see the module)."""

    Options = HalfOptions
    dtype: ClassVar[torch.dtype]

    def reduce_(self, buf, step):
        half_sum_(self.world, buf, self.dtype)

    @classmethod
    def wire(cls, numel, matrices, world_size, options):
        return sum_wire(numel, world_size, cls.name)


@register("fp16")
class FP16(Half):
    dtype = torch.float16
    bench = ("fp16", {})


@register("bf16")
class BF16(Half):
    dtype = torch.bfloat16
