"""Blockwise model-update filtering (Chen & Huo 2016)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt
from .base import register
from .helpers import Every, FlatParams, LocalSteps


@dataclass(frozen=True)
class Options:
    period: int = opt(4, gt=0, max=10**6, help="local steps per block (τ)")
    momentum: float = opt(-1.0, min=-1.0, help="block momentum η (-1 = 1 - 1/N)")
    lr: float = opt(1.0, gt=0.0, help="block learning rate ζ")
    nesterov: bool = opt(True, help="restart from W_g + ηΔ (Nesterov) or W_g")


@register("bmuf")
class BMUF(LocalSteps):
    """Every block of `period` = τ local steps:
        G = mean_i(W_i) - W_start;  Δ = η Δ + ζ G;  W_g += Δ
    and the workers restart from W_start = W_g + η Δ (Nesterov, default) or W_g. G is the
    block's progress from where the workers started, so the Nesterov form is exactly
    Nesterov momentum over blocks (measuring G from W_g instead counts the look-ahead twice
    and diverged at η = 0.75, ζ = 1 on digits). η = 0, ζ = 1 is model averaging. W_g and Δ
    are replicated on every rank; local optimizer state stays local."""

    Options = Options

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log
        o = options
        self.eta = o.momentum if o.momentum >= 0 else 1.0 - 1.0 / world.size
        self.zeta = o.lr

    def setup(self, model, optimizer, resources):
        self.world.broadcast_module(model)
        self.flat = FlatParams(model)
        self.block = Every(self.options.period, self._end_block)
        self.global_w = self.flat.data.clone()
        self.start = self.flat.data.clone()  # where the workers began this block
        self.delta = self.flat.data.new_zeros(self.flat.data.shape)
        self.replicated = {"global_w": self.global_w, "delta": self.delta, "start": self.start}
        if self.log and self.world.is_root:
            self.log.info(f"bmuf: block {self.options.period} steps, block momentum {self.eta:.3f}, block lr "
                          f"{self.zeta}, {'Nesterov' if self.options.nesterov else 'plain'}")

    def _end_block(self):
        """Collective: one allreduce of the parameters, then the filtered update."""
        mean = self.world.average_(self.flat.data.clone())
        self.delta.mul_(self.eta).add_(mean - self.start, alpha=self.zeta)
        self.global_w.add_(self.delta)
        self.start.copy_(self.global_w)
        if self.options.nesterov:
            self.start.add_(self.delta, alpha=self.eta)
        self.flat.data.copy_(self.start)
