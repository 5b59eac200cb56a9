"""A model whose parameters and gradients live in two flat buffers."""

from __future__ import annotations

import torch

from ..errors import UserError


class FlatModel:
    """Parameters and gradients of a model as views of two flat buffers (one copy-free
    reduction or store access for the whole model)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len({p.dtype for p in self.params}) > 1 or len({p.device for p in self.params}) > 1:
            raise UserError("this strategy needs all parameters of one dtype on one device")
        n = sum(p.numel() for p in self.params)
        like = self.params[0]
        self.flat = torch.empty(n, dtype=like.dtype, device=like.device)
        self.grad = torch.zeros(n, dtype=like.dtype, device=like.device)
        off = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                self.flat[off:off + k].copy_(p.reshape(-1))
                p.data = self.flat[off:off + k].view_as(p)
                off += k
        self.attach_grads()

    def attach_grads(self):
        off = 0
        for p in self.params:
            p.grad = self.grad[off:off + p.numel()].view_as(p)
            off += p.numel()

    def detach_grads(self):
        for p in self.params:
            p.grad = None
