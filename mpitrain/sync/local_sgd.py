"""Local SGD (model averaging every H steps) and post-local SGD (synchronous first)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt
from .base import register
from .helpers import Every, FlatParams, LocalSteps


@dataclass(frozen=True)
class Options:
    period: int = opt(4, gt=0, max=10**6, help="steps between averages (1 = synchronous SGD)")


@dataclass(frozen=True)
class PostLocalOptions(Options):
    local_start: int = opt(100, min=0, help="synchronous steps (gradient mean) before local SGD")


@register("local_sgd")
class LocalSGD(LocalSteps):
    """Every `period` = H steps the parameters are replaced by their mean over ranks, and
    at every consolidation (evaluation, checkpoint). Each rank steps on its own gradient;
    optimizer state (momentum, Adam moments) stays local and is never averaged. For SGD
    with momentum H = 1 is still exactly synchronous SGD: momentum is linear, so the mean
    of the local buffers is the buffer of the mean gradient."""

    Options = Options

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log

    def setup(self, model, optimizer, resources):
        self.world.broadcast_module(model)
        self.flat = FlatParams(model)
        self.block = Every(self.options.period, lambda: self.world.average_(self.flat.data))


@register("post_local_sgd")
class PostLocalSGD(LocalSGD):
    """Synchronous SGD (gradient mean every step) for the first `local_start` = K steps of
    the run, then local SGD with period H (Lin et al. 2020)."""

    Options = PostLocalOptions

    def after_backward(self, step):
        if step < self.options.local_start:
            self.world.average_(self.flat.gather_grads())

    def after_step(self, step):
        if step >= self.options.local_start:  # before: replicas identical, nothing to average
            super().after_step(step)
