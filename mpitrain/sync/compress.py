"""Gradient compression for the allreduce strategy, in the spirit of torch DDP's comm
hooks: a small state object per job whose `reduce_(grad, step)` turns this rank's flat
gradient into the sum over ranks (the loss is pre-scaled, so the sum is the mean) while
sending fewer bytes. Collectives go through World (no MPI here).

- Half(fp16|bf16): 2-byte payloads, sums in float32: an all-to-all of chunks (each rank
  sums one chunk of every rank's gradient in fp32), then an allgather of the 2-byte sums.
  MPI never reduces a half type (Open MPI has no fp16 and sums bf16 as another type).
- TopK(ratio): the largest |values| of gradient + residual (error feedback); indices and
  values allgathered and summed; what was not sent stays in the residual.
- PowerSGD(rank) (Vogels et al. 2019): per weight matrix M (with error feedback),
  P = M Q, allreduce, orthogonalise, Q = M^T P, allreduce, M ~ P Q^T; Q warm-starts from
  the last step; vectors and small matrices go uncompressed in one allreduce; plain
  allreduce for the first `start_step` steps.
- Sign (EF-signSGD, Karimireddy et al. 2019): sign bits (packed, 1/32 of fp32) times
  the mean |value| per rank, with error feedback.

`state()` names what a resume must restore: (this rank's error feedback, state equal on
every rank); `state_arrays` and `load_state` turn it into checkpoint arrays and back.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Half:
    def __init__(self, world, dtype: torch.dtype):
        self.world, self.dtype = world, dtype

    def state(self) -> tuple[dict, dict]:
        return {}, {}  # stateless

    def reduce_(self, grad: torch.Tensor, step: int) -> None:
        n = self.world.size
        # fp16 (max 65504): a power-of-two scale, agreed, so that the sum of n values fits
        # and small gradients keep their digits; bf16 has float32's range
        scale = 1.0
        if self.dtype == torch.float16:
            top = self.world.max(float(grad.abs().max()) if grad.numel() else 0.0)
            if 0 < top < float("inf"):
                scale = 2.0 ** math.floor(math.log2(30000.0 / (n * top)))
        chunk = math.ceil(grad.numel() / n)
        padded = torch.zeros(n * chunk, dtype=self.dtype, device=grad.device)
        padded[:grad.numel()] = grad * scale
        mine = self.world.alltoall_tensor(padded.view(n, chunk)).float().sum(0)  # my chunk, fp32 sums
        full = self.world.allgather_tensor(mine.to(self.dtype)).reshape(-1)[:grad.numel()]
        grad.copy_(full.float() / scale)


class TopK:
    def __init__(self, world, grad: torch.Tensor, ratio: float):
        self.world, self.k = world, max(1, int(round(ratio * grad.numel())))
        self.residual = torch.zeros_like(grad)

    def state(self) -> tuple[dict, dict]:
        return {"residual": self.residual}, {}

    def reduce_(self, grad: torch.Tensor, step: int) -> None:
        acc = grad + self.residual
        idx = acc.abs().topk(self.k, sorted=False).indices
        vals = acc[idx]
        self.residual.copy_(acc).index_fill_(0, idx, 0.0)  # exactly what was not sent
        all_idx = self.world.allgather_tensor(idx.to(torch.int32)).reshape(-1).long()
        all_vals = self.world.allgather_tensor(vals).reshape(-1)
        grad.zero_().index_add_(0, all_idx, all_vals)


class Sign:
    def __init__(self, world, grad: torch.Tensor):
        self.world = world
        self.residual = torch.zeros_like(grad)

    def state(self) -> tuple[dict, dict]:
        return {"residual": self.residual}, {}

    def reduce_(self, grad: torch.Tensor, step: int) -> None:
        acc = grad + self.residual
        scale = acc.abs().mean()
        positive = acc >= 0
        self.residual.copy_(acc - torch.where(positive, scale, -scale))
        bits = torch.from_numpy(np.packbits(positive.cpu().numpy()))
        all_bits = self.world.allgather_tensor(bits).cpu().numpy()
        scales = self.world.allgather_tensor(scale.reshape(1).float()).reshape(-1).tolist()
        # sum_i s_i (2 b_i - 1) = sum_i 2 s_i b_i - sum_i s_i, one rank's bits at a time
        # (no ranks x values temporaries)
        grad.fill_(-sum(scales))
        for s, row in zip(scales, all_bits):
            b = torch.from_numpy(np.unpackbits(row, count=grad.numel())).to(grad.device, grad.dtype)
            grad.add_(b, alpha=2 * s)


class PowerSGD:
    def __init__(self, world, params: list, grad: torch.Tensor, rank: int, start_step: int, min_numel: int):
        self.world, self.rank, self.start_step = world, rank, start_step
        self.matrices, self.rest, off = [], [], 0  # (offset, rows, cols) views into the flat gradient
        gen = torch.Generator().manual_seed(0)  # the same Q on every rank
        self.q, self.error = [], []
        for p in params:
            k = p.numel()
            rows, cols = (p.shape[0], k // p.shape[0]) if p.ndim >= 2 else (k, 1)
            r = min(rank, rows, cols)
            if p.ndim >= 2 and k >= min_numel:
                self.matrices.append((off, rows, cols))
                self.q.append(torch.randn(cols, r, generator=gen).to(grad.device, grad.dtype))
                self.error.append(torch.zeros(rows, cols, device=grad.device, dtype=grad.dtype))
            else:
                self.rest.append((off, k))
            off += k

    def state(self) -> tuple[dict, dict]:
        return ({f"error.{i}": e for i, e in enumerate(self.error)},
                {f"q.{i}": q for i, q in enumerate(self.q)})  # Q: the same on every rank

    def reduce_(self, grad: torch.Tensor, step: int) -> None:
        if step < self.start_step:
            self.world.allreduce_(grad)
            return
        if self.rest:  # vectors and small matrices: one plain allreduce
            flat = torch.cat([grad[o:o + k] for o, k in self.rest])
            self.world.allreduce_(flat)
            pos = 0
            for o, k in self.rest:
                grad[o:o + k].copy_(flat[pos:pos + k])
                pos += k
        if not self.matrices:
            return
        ms = [grad[o:o + r * c].view(r, c) + e for (o, r, c), e in zip(self.matrices, self.error)]
        ps = [m @ q for m, q in zip(ms, self.q)]
        self._allreduce(ps)
        ps = [torch.linalg.qr(p).Q for p in ps]
        qs = [m.T @ p for m, p in zip(ms, ps)]
        for m, p, q, e in zip(ms, ps, qs, self.error):
            e.copy_(m - p @ q.T)  # error feedback: this rank's part the approximation does not carry
        self._allreduce(qs)
        for (o, r, c), p, q, q_old in zip(self.matrices, ps, qs, self.q):
            grad[o:o + r * c].copy_((p @ q.T).reshape(-1))  # the sum over ranks, rank r
            q_old.copy_(q)  # warm start

    def _allreduce(self, tensors: list) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.world.allreduce_(flat)
        pos = 0
        for t in tensors:
            t.copy_(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()


def state_arrays(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
    """Copies of named tensors as arrays, keyed prefix + name."""
    return {prefix + k: t.detach().cpu().numpy().copy() for k, t in tensors.items()}


def load_state(tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], prefix: str) -> bool:
    """Copy arrays[prefix + name] into every named tensor when the arrays under prefix are
    exactly those names with the same shapes and dtypes (True); else change nothing (False)."""
    got = {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
    if set(got) != set(tensors) or any(got[k].shape != tuple(t.shape) or str(got[k].dtype) != str(t.dtype)[6:]
                                       for k, t in tensors.items()):  # torch.float32 vs float32
        return False
    with torch.no_grad():
        for k, t in tensors.items():
            t.copy_(torch.from_numpy(np.array(got[k])))
    return True


def create(options, world, params: list, grad: torch.Tensor):
    """The compressor for options.compress (not "none")."""
    kind = options.compress
    if kind in ("fp16", "bf16"):
        return Half(world, torch.float16 if kind == "fp16" else torch.bfloat16)
    if kind == "topk":
        return TopK(world, grad, options.topk_ratio)
    if kind == "sign":
        return Sign(world, grad)
    return PowerSGD(world, params, grad, options.powersgd_rank, options.powersgd_start_step,
                    options.powersgd_min_numel)
