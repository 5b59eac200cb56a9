"""Blockwise model-update filtering (Chen & Huo 2016)."""

from __future__ import annotations

from .base import register
from .periodic import PeriodicStrategy


@register("bmuf")
class BMUF(PeriodicStrategy):
    """Every block of sync.period = τ local steps:
        G = mean_i(W_i) - W_start;  Δ = η Δ + ζ G;  W_g += Δ
    and the workers restart from W_start = W_g + η Δ (Nesterov, default) or W_g
    (sync.bmuf_nesterov = false). η = sync.bmuf_momentum (default 1 - 1/N), ζ =
    sync.bmuf_lr (default 1). G is the block's progress from where the workers started, so
    the Nesterov form is exactly Nesterov momentum over blocks (measuring G from W_g instead
    counts the look-ahead twice and diverged at η = 0.75, ζ = 1 on digits). η = 0, ζ = 1 is
    model averaging. W_g and Δ are replicated on every rank; local optimizer state stays
    local."""

    def init_state(self):
        s, n = self.cfg.sync, self.world.size
        self.eta = s.bmuf_momentum if s.bmuf_momentum >= 0 else 1.0 - 1.0 / n
        self.zeta = s.bmuf_lr
        self.global_w = self.flat.flat.clone()
        self.start = self.flat.flat.clone()  # where the workers began this block
        self.delta = self.flat.flat.new_zeros(self.flat.flat.shape)
        if self.log and self.world.is_root:
            self.log.info(f"bmuf: block {self.period} steps, block momentum {self.eta:.3f}, block lr {self.zeta}, "
                          f"{'Nesterov' if s.bmuf_nesterov else 'plain'}")

    def sync_block(self):
        mean = self.allreduce_(self.flat.flat.clone())
        self.delta.mul_(self.eta).add_(mean - self.start, alpha=self.zeta)
        self.global_w.add_(self.delta)
        self.start.copy_(self.global_w)
        if self.cfg.sync.bmuf_nesterov:
            self.start.add_(self.delta, alpha=self.eta)
        self.flat.flat.copy_(self.start)

    STATE = ("global_w", "delta", "start")
