"""Parameter sharing through the one-sided KVStore: ps_sync, ssp and async (ASGD).

The model's parameters are one KVStore key sharded over all ranks; the optimizer runs
store-side (`sync.*` and `optim.*` configure it), so the local torch optimizer is skipped:
after each push the gradients are detached (`.grad = None`) and `optimizer.step()` is a
no-op, then the pulled parameters overwrite the local ones. The LR schedule still runs
locally and its current lr is handed to the store every step.

Optimizer state (momentum buffers, Adam moments, step) lives with each shard in the
owner's window and is identical to what one optimizer over the whole model would hold.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..kvstore import KVStore
from .base import broadcast_model, register
from .flat import FlatModel


class _StoreStrategy:
    mode = "sync"

    def __init__(self, cfg, world, log=None):
        self.cfg, self.world, self.log = cfg, world, log
        self.kv: KVStore | None = None
        self.optimizer = None
        self.bytes_last = 0
        self.steps_last = 0

    @classmethod
    def staleness_of(cls, cfg) -> int:
        return 0

    def setup(self, model, optimizer):
        broadcast_model(model, self.world)
        self.flat = FlatModel(model)
        if self.flat.flat.is_cuda:
            raise UserError(f"sync.strategy = {self.name!r} keeps parameters in host RMA windows: "
                            "use train.device = 'cpu'")
        self.optimizer = optimizer
        self.kv = self.make_store(self.cfg, self.world.parent or self.world, self.world,
                                  optimizer.param_groups[0]["lr"])
        self.kv.init("params", self.flat.flat)
        if self.log and self.world.is_root:
            where = (f"{self.cfg.sync.servers} dedicated server ranks" if self.cfg.sync.servers
                     else f"all {self.world.size} ranks")
            self.log.info(f"{self.name}: {self.flat.flat.numel():,} parameters in RMA windows on {where}, "
                          f"store-side {self.cfg.optim.name}")

    @classmethod
    def make_store(cls, cfg, job, workers, lr=0.0) -> KVStore:
        """Collective over the whole job: the store, sharded over all ranks or the servers."""
        o, s = cfg.optim, cfg.sync
        owners = list(range(job.size - s.servers, job.size)) if s.servers else None
        return KVStore(job, cls.mode, optimizer=o.name, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                       weight_decay=o.weight_decay, betas=o.betas, staleness=cls.staleness_of(cfg),
                       dc_lambda=s.dc_lambda, rescale=1.0, owners=owners, workers=job.size - s.servers,
                       barrier_comm=workers.comm if workers is not None else None, timeout=s.timeout_s or None)

    @classmethod
    def serve(cls, cfg, job, servers, log=None):
        """Collective (dedicated server rank): agree on the workers' set-up, host the shards,
        return when the workers close the store. Workers apply the updates themselves (one-
        sided), so a server only keeps its windows reachable (progress thread)."""
        job.raise_any(None)  # the workers' set-up succeeded (else: their error, here too)
        kv = cls.make_store(cfg, job, None)
        kv.init("params", torch.empty(0))
        if log and servers.is_root:
            log.info(f"server ranks {job.size - cfg.sync.servers}..{job.size - 1}: hosting "
                     f"{kv.keys['params'].n:,} parameters")
        kv.close()

    def loss_weight(self, global_count):
        # each push is this rank's share of the global-batch mean: summed (sync, ssp) they
        # are one synchronous step; applied one by one (async) a round of N pushes moves
        # the parameters as far as one synchronous step (MXNet's rescale_grad = 1/N)
        return 1.0 / global_count

    def zero_grad(self):
        self.flat.grad.zero_()
        self.flat.attach_grads()

    def after_backward(self, step):
        self.kv.set_lr(self.optimizer.param_groups[0]["lr"])
        self.kv.push("params", self.flat.grad, read_at=self.flat.flat)
        self.flat.detach_grads()  # the store applied the optimizer: the local step is a no-op

    def after_step(self, step):
        with torch.no_grad():
            self.kv.pull("params", self.flat.flat)

    def before_eval(self):
        """Collective: everyone evaluates the same, fully applied parameters."""
        self.kv.barrier()
        with torch.no_grad():
            self.kv.pull("params", self.flat.flat, fresh=True)

    def after_eval(self):
        pass

    def metrics(self) -> dict:
        seen = self.kv.staleness_seen
        out = {"comm_bytes_per_step": (self.kv.bytes_moved - self.bytes_last) / max(1, self.kv.clock["params"]
                                                                                  - self.steps_last)}
        self.bytes_last, self.steps_last = self.kv.bytes_moved, self.kv.clock["params"]
        if seen:
            out.update(staleness_max=int(max(seen)), staleness_mean=float(np.mean(seen)))
            seen.clear()
        return out

    def state_dict(self):
        """Collective: the store's values and store-side optimizer state, whole (rank 0)."""
        self.kv.barrier()
        out = {}
        if self.world.is_root:
            params, opt, step = self.kv.keys["params"].read_all()
            out = {"store_params": params, "store_optimizer": opt, "store_step": np.array(step)}
        self.kv.barrier()
        return out

    def load_state_dict(self, arrays):
        """Reshard a checkpoint's store over this run's owners (any number of ranks)."""
        self.kv.barrier()
        if self.world.is_root and "store_params" in arrays:
            self.kv.keys["params"].write_all(arrays["store_params"], arrays.get("store_optimizer"),
                                             float(arrays.get("store_step", 0)))
        self.kv.barrier()
        with torch.no_grad():
            self.kv.pull("params", self.flat.flat)

    def close(self):
        if self.kv is not None:
            self.kv.close()
            self.kv = None


@register("ps_sync")
class PSSync(_StoreStrategy):
    """Every step: push gradients, the store sums all N and applies the optimizer once,
    everyone pulls. Numerically the same as `allreduce` with the same optimizer."""

    mode = "sync"


@register("ssp")
class SSP(_StoreStrategy):
    """Stale-synchronous parallel (Ho et al. 2013): a worker at clock c reads parameters
    that include every update of clocks < c - s (s = sync.staleness); s = 0 is ps_sync."""

    mode = "sync"

    @classmethod
    def staleness_of(cls, cfg):
        return cfg.sync.staleness


@register("async")
class AsyncPS(_StoreStrategy):
    """ASGD / Downpour: push and pull without waiting for anyone; sync.dc_lambda > 0 turns
    on delay compensation (DC-ASGD, λ = 0.04 in the paper)."""

    mode = "async"
