"""Shared machinery of the strategies that train locally and synchronise every few steps.

Each rank steps its own optimizer on its own gradient (the loss is weighted to the local
mean). Every `sync.period` steps, and at the end of each epoch (so evaluation and the next
epoch start from the synchronised model), `sync_block()` runs — one collective on the flat
parameter buffer. Optimizer state (momentum, Adam moments) stays local to each rank and is
never averaged; for SGD with momentum this is still exact at period 1, because momentum is
linear: the mean of the local buffers is the buffer of the mean gradient.
"""

from __future__ import annotations

import torch

from ..comm import buffers
from .base import broadcast_model
from .flat import FlatModel


class PeriodicStrategy:
    def __init__(self, cfg, world, log=None):
        self.cfg, self.world, self.log = cfg, world, log
        self.period = cfg.sync.period
        self.local_steps = 0  # since the last synchronisation
        self.steps = 0
        self.bytes = 0
        self._bytes_mark = (0, 0)

    # -- protocol ------------------------------------------------------------------------
    def setup(self, model, optimizer):
        broadcast_model(model, self.world)
        self.flat = FlatModel(model)
        self.optimizer = optimizer
        self.init_state()

    def init_state(self):
        """Strategy state from the (identical) initial parameters."""

    def loss_weight(self, global_count):
        return self.world.size / global_count  # this rank's mean: it steps on its own gradient

    def zero_grad(self):
        self.flat.grad.zero_()
        self.flat.attach_grads()

    def after_backward(self, step):
        pass

    def after_step(self, step):
        self.steps += 1
        self.local_steps += 1
        if self.local_steps >= self.period:
            self._sync()

    def before_eval(self):
        if self.local_steps:
            self._sync()

    def after_eval(self):
        pass

    def metrics(self):
        b0, s0 = self._bytes_mark
        self._bytes_mark = (self.bytes, self.steps)
        return {"comm_bytes_per_step": (self.bytes - b0) / max(1, self.steps - s0)}

    def state_dict(self):
        """Replicated tensors named in STATE, identical on every rank after a block."""
        return {k: getattr(self, k).cpu().numpy().copy() for k in self.STATE}

    def load_state_dict(self, arrays):
        for k in self.STATE:
            if k in arrays:
                getattr(self, k).copy_(torch.from_numpy(arrays[k]))

    STATE: tuple[str, ...] = ()

    def close(self):
        pass

    # -- helpers -------------------------------------------------------------------------
    def _sync(self):
        self.sync_block()
        self.local_steps = 0

    def sync_block(self):
        raise NotImplementedError

    def allreduce_(self, t: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Collective: in-place sum (or mean) of a flat tensor over all ranks, counted."""
        buffers.allreduce_(self.world.comm, t)
        n = self.world.size
        self.bytes += int(2 * (n - 1) / n * t.numel() * t.element_size())
        return t.div_(n) if mean else t
