"""PowerSGD (Vogels et al. 2019), per bucket: for each weight matrix M of at least
`min_numel` values (with error feedback), P = M Q, sum over ranks, orthogonalise (QR),
Q = M^T P, sum, M ~ P Q^T. Q warm-starts from the last step (first drawn from a fixed
generator, so it is the same on every rank); vectors and small matrices go uncompressed
in one sum; for the first `start_step` steps the whole bucket is summed uncompressed.
Every sum goes on the wire as `payload` (a half payload is summed in float32, as
kind = fp16/bf16 do), so P and Q can travel in 2 bytes per value."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...options import opt
from .base import Compressor, matrix_shape, payload_opt, register
from .half import sum_, sum_wire


@dataclass(frozen=True)
class PowerSGDOptions:
    rank: int = opt(2, min=1, max=4096, help="rank of the approximation")
    start_step: int = opt(0, min=0, help="sum the buckets uncompressed for this many steps first")
    min_numel: int = opt(4096, min=0, help="smaller matrices and vectors go uncompressed (one sum per bucket)")
    payload: str = payload_opt("P, Q and the uncompressed values")


def _split(layout_shapes, min_numel: int):
    """Indices of the compressed matrices and of the rest, from the parameters' shapes."""
    mats = [i for i, s in enumerate(layout_shapes) if len(s) >= 2 and math.prod(s) >= min_numel]
    return mats, [i for i in range(len(layout_shapes)) if i not in set(mats)]


@register("powersgd")
class PowerSGD(Compressor):
    Options = PowerSGDOptions
    bench = ("powersgd r2", {"rank": 2, "min_numel": 0})

    def __init__(self, options, buf, layout, world):
        super().__init__(options, buf, layout, world)
        mats, rest = _split([s for _, s in layout], options.min_numel)
        self.matrices = [(layout[i][0], *matrix_shape(layout[i][1])) for i in mats]  # (offset, rows, cols)
        self.rest = [(layout[i][0], math.prod(layout[i][1])) for i in rest]  # (offset, numel)
        gen = torch.Generator().manual_seed(0)  # the same Q on every rank
        self.q = [torch.randn(c, min(options.rank, r, c), generator=gen).to(buf.device, buf.dtype)
                  for _, r, c in self.matrices]
        self.error = [torch.zeros(r, c, device=buf.device, dtype=buf.dtype) for _, r, c in self.matrices]
        self.shared = {f"q{i}": q for i, q in enumerate(self.q)}  # Q: the same on every rank
        self.own = {f"error{i}": e for i, e in enumerate(self.error)}

    def reduce_(self, buf, step):
        payload = self.options.payload
        if step < self.options.start_step:
            sum_(self.world, buf, payload)
            return
        if self.rest:  # vectors and small matrices: one plain sum
            flat = torch.cat([buf[o:o + k] for o, k in self.rest])
            sum_(self.world, flat, payload)
            pos = 0
            for o, k in self.rest:
                buf[o:o + k].copy_(flat[pos:pos + k])
                pos += k
        if not self.matrices:
            return
        ms = [buf[o:o + r * c].view(r, c) + e for (o, r, c), e in zip(self.matrices, self.error)]
        ps = [m @ q for m, q in zip(ms, self.q)]
        self._sum(ps)
        ps = [torch.linalg.qr(p).Q for p in ps]
        qs = [m.T @ p for m, p in zip(ms, ps)]
        for m, p, q, e in zip(ms, ps, qs, self.error):
            e.copy_(m - p @ q.T)  # error feedback: this rank's part the approximation does not carry
        self._sum(qs)
        for (o, r, c), p, q, q_old in zip(self.matrices, ps, qs, self.q):
            buf[o:o + r * c].copy_((p @ q.T).reshape(-1))  # the sum over ranks, rank r
            q_old.copy_(q)  # warm start

    def _sum(self, tensors: list) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        sum_(self.world, flat, self.options.payload)
        pos = 0
        for t in tensors:
            t.copy_(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()

    @classmethod
    def wire(cls, numel, matrices, world_size, options):
        """The compressed steps' traffic (after start_step)."""
        big = [(r, c) for r, c in matrices if r * c >= options.min_numel]
        rest = numel - sum(r * c for r, c in big)
        p = sum(r * min(options.rank, r, c) for r, c in big)
        q = sum(c * min(options.rank, r, c) for r, c in big)
        return [w for count in ((rest, p, q) if big else (rest,)) if count
                for w in sum_wire(count, world_size, options.payload)]
