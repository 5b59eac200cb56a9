"""Elastic averaging SGD (Zhang, Choromanska & LeCun 2015), synchronous and asynchronous."""

from __future__ import annotations

import torch

from ..kvstore import KVStore
from .base import register
from .periodic import PeriodicStrategy


class _Elastic(PeriodicStrategy):
    """Workers are pulled towards a center variable x̃ every sync.period = τ steps, with
    moving rate α = sync.easgd_alpha (default β/p) and center rate β/p, β = sync.easgd_beta.
    Evaluation uses the center. Local optimizer state stays local."""

    def init_state(self):
        s, p = self.cfg.sync, self.world.size
        self.beta = s.easgd_beta
        self.alpha = s.easgd_alpha or self.beta / p
        self.saved = None

    def before_eval(self):
        super().before_eval()  # end the block
        self.settle()
        self.saved = self.flat.flat.clone()
        self.flat.flat.copy_(self.center())

    def settle(self):
        """Collective: every worker's last contribution is in the center."""

    def after_eval(self):
        self.flat.flat.copy_(self.saved)
        self.saved = None


@register("easgd")
class EASGD(_Elastic):
    """Synchronous form, one allreduce of (x_i − x̃) per block:
        x̃ += (β/p) Σ_i (x_i − x̃);   x_i −= α (x_i − x̃)
    The workers move towards the *updated* center (Gauss–Seidel order), so α = β = 1 is
    exactly model averaging; for small α it differs from the paper's simultaneous form only
    at second order. x̃ is replicated on every rank."""

    def init_state(self):
        super().init_state()
        self.x_center = self.flat.flat.clone()

    def center(self):
        return self.x_center

    def sync_block(self):
        diff = self.allreduce_(self.flat.flat - self.x_center, mean=False)
        self.x_center.add_(diff, alpha=self.beta / self.world.size)
        self.flat.flat.sub_(self.flat.flat - self.x_center, alpha=self.alpha)

    STATE = ("x_center",)


@register("easgd_async")
class AsyncEASGD(_Elastic):
    """Asynchronous form on the one-sided store: every τ steps a worker reads the latest
    x̃, moves x_i −= α (x_i − x̃) and adds α (x_i − x̃) to x̃ atomically, without waiting."""

    def init_state(self):
        super().init_state()
        self.kv = KVStore(self.world, "async", timeout=self.cfg.sync.timeout_s or None)
        self.kv.init("center", self.flat.flat)
        self.read = torch.empty_like(self.flat.flat)

    def center(self):
        return self.kv.pull("center", out=self.read)

    def sync_block(self):
        diff = (self.flat.flat - self.center()).mul_(self.alpha)
        self.flat.flat.sub_(diff)
        self.kv.add("center", diff)
        self.bytes += 2 * diff.numel() * diff.element_size()

    def settle(self):
        self.kv.barrier()

    def state_dict(self):
        self.kv.barrier()
        return {"x_center": self.center().cpu().numpy().copy()}

    def load_state_dict(self, arrays):
        self.kv.barrier()
        if self.world.is_root and "x_center" in arrays:
            self.kv.keys["center"].put_all(arrays["x_center"])
        self.kv.barrier()

    def close(self):
        self.kv.close()
