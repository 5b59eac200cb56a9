"""Elastic averaging SGD (Zhang, Choromanska & LeCun 2015), synchronous and asynchronous."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..options import opt
from . import kvstore
from .base import register
from .helpers import Every, FlatParams, LocalSteps


@dataclass(frozen=True)
class Options:
    period: int = opt(4, gt=0, max=10**6, help="local steps between elastic updates (τ)")
    beta: float = opt(0.9, gt=0.0, help="center moving rate x p (β)")
    alpha: float = opt(0.0, min=0.0, help="worker moving rate (0 = β/p)")


@dataclass(frozen=True)
class AsyncOptions(Options):
    timeout_s: float = opt(0.0, min=0.0, help="give up waiting for the store after this long (0 = never)")


@contextlib.contextmanager
def _center_swapped_in(flat: FlatParams, center: torch.Tensor):
    """Within the block the model holds the center (evaluation and checkpoints use it)."""
    saved = flat.data.clone()
    flat.data.copy_(center)
    yield
    flat.data.copy_(saved)


@register("easgd")
class EASGD(LocalSteps):
    """Synchronous form, one allreduce of (x_i − x̃) every `period` = τ steps:
        x̃ += (β/p) Σ_i (x_i − x̃);   x_i −= α (x_i − x̃)
    The workers move towards the *updated* center (Gauss–Seidel order), so α = β = 1 is
    exactly model averaging; for small α it differs from the paper's simultaneous form only
    at second order. x̃ is replicated on every rank; local optimizer state stays local."""

    Options = Options

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log
        self.beta = options.beta
        self.alpha = options.alpha or options.beta / world.size

    def setup(self, model, optimizer, resources):
        self.world.broadcast_module(model)
        self.flat = FlatParams(model)
        self.block = Every(self.options.period, self._elastic_update)
        self.x_center = self.flat.data.clone()
        self.replicated = {"x_center": self.x_center}

    @contextlib.contextmanager
    def consolidated(self):
        self.block.flush()
        with _center_swapped_in(self.flat, self.x_center):
            yield

    def _elastic_update(self):
        diff = self.world.allreduce_(self.flat.data - self.x_center)
        self.x_center.add_(diff, alpha=self.beta / self.world.size)
        self.flat.data.sub_(self.flat.data - self.x_center, alpha=self.alpha)


@register("easgd_async")
class AsyncEASGD(LocalSteps):
    """Asynchronous form on the one-sided store: every τ steps a worker reads the latest
    x̃, moves x_i −= α (x_i − x̃) and adds α (x_i − x̃) to x̃ atomically, without waiting."""

    Options = AsyncOptions

    def __init__(self, options: AsyncOptions, world, log=None):
        self.options, self.world, self.log = options, world, log
        self.alpha = options.alpha or options.beta / world.size

    def setup(self, model, optimizer, resources):
        self.world.broadcast_module(model)
        self.flat = FlatParams(model)
        self.block = Every(self.options.period, self._elastic_update)
        self.kv = kvstore.create(self.world, "dist_async", timeout=self.options.timeout_s or None)
        resources.callback(self.kv.close)
        self.kv.init("center", self.flat.data)
        self.read = torch.empty_like(self.flat.data)

    @contextlib.contextmanager
    def consolidated(self):
        self.block.flush()
        self.kv.barrier()  # every worker's last contribution is in the center
        with _center_swapped_in(self.flat, self.kv.pull("center", self.read)):
            yield

    def _elastic_update(self):
        diff = (self.flat.data - self.kv.pull("center", self.read)).mul_(self.alpha)
        self.flat.data.sub_(diff)
        self.kv.add("center", diff)

    def state_dict(self):
        """Collective: the block position and (rank 0) the center from the store."""
        center = self.kv.state_dict().get("center.value")  # complete on rank 0 only
        return super().state_dict() | ({"x_center": center} if center is not None else {})

    def load_state_dict(self, arrays):
        """Collective."""
        super().load_state_dict(arrays)
        self.kv.load_state_dict({"center.value": arrays["x_center"]} if "x_center" in arrays else {})
