"""Local SGD (model averaging every H steps) and post-local SGD (sync first, then local)."""

from __future__ import annotations

from .base import register
from .periodic import PeriodicStrategy


@register("local_sgd")
class LocalSGD(PeriodicStrategy):
    """Every sync.period = H steps the parameters are replaced by their mean over ranks
    (H = 1 is synchronous SGD). Optimizer state stays local (see periodic.py)."""

    def sync_block(self):
        self.allreduce_(self.flat.flat)


@register("post_local_sgd")
class PostLocalSGD(LocalSGD):
    """Synchronous SGD (gradient mean every step) for the first sync.local_start = K steps,
    then local SGD with period H (Lin et al. 2020)."""

    def after_backward(self, step):
        if self.steps < self.cfg.sync.local_start:
            self.allreduce_(self.flat.grad)

    def after_step(self, step):
        if self.steps < self.cfg.sync.local_start:
            self.steps += 1  # replicas stay identical: nothing to average
        else:
            super().after_step(step)
