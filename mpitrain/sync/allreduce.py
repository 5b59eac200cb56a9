"""Synchronous data parallelism: bucketed gradient allreduce overlapped with backward."""

from __future__ import annotations

import numpy as np

from ..comm.collectives import GradBuckets
from .base import broadcast_model, register


@register("allreduce")
class AllreduceStrategy:
    """Every step: mean of the gradients over all ranks, then the same optimizer step
    everywhere. Optimizer state stays local and identical on all ranks."""

    def __init__(self, cfg, world, log=None):
        self.cfg, self.world, self.log = cfg, world, log
        self.buckets: GradBuckets | None = None

    def setup(self, model, optimizer):
        broadcast_model(model, self.world)
        s = self.cfg.sync
        overlap = s.overlap
        if overlap == "auto":  # a comm thread only pays when it has a core of its own
            overlap = "thread" if self.world.cores_per_rank() >= 2 or self.cfg.train.device != "cpu" else "none"
        self.buckets = GradBuckets(model.parameters(), self.world.comm,
                                   bucket_bytes=int(s.bucket_mb * 2**20),
                                   first_bucket_bytes=int(s.first_bucket_mb * 2**20),
                                   overlap=overlap, average=False, cuda_path=self.cfg.comm.cuda_path,
                                   log=self.log)
        if self.log and self.world.is_root:
            sizes = ", ".join(f"{f.numel() * f.element_size() / 2**20:.1f}" for f in self.buckets.flat)
            self.log.info(f"allreduce: {len(self.buckets.flat)} buckets ({sizes} MB), overlap {overlap}")

    def loss_weight(self, global_count):
        return 1.0 / global_count  # the SUM over ranks is then the global-batch mean

    def zero_grad(self):
        self.buckets.zero_()

    def after_backward(self, step):
        self.buckets.finish()

    def after_step(self, step):
        pass

    def before_eval(self):
        pass

    def after_eval(self):
        pass

    def metrics(self):
        # what each rank sends in a bandwidth-optimal (ring) allreduce of all buckets
        n = self.world.size
        return {"comm_bytes_per_step": 2 * (n - 1) / n * self.buckets.nbytes}

    def state_dict(self):
        return {}

    def load_state_dict(self, arrays):
        pass

    def close(self):
        if self.buckets is not None:
            self.buckets.close()
            self.buckets = None
