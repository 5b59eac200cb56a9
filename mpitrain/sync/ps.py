"""Parameter sharing through the one-sided KVStore: ps_sync, ssp and async (ASGD).

The model's parameters are one KVStore key sharded over all ranks, or over `servers`
dedicated ranks at the end of the job. The optimizer runs store-side (the same kind and
settings as the job's torch optimizer), so the local step is skipped: after each push the
gradients are detached (`.grad = None`, `optimizer.step()` is then a no-op), and the
pulled parameters overwrite the local ones. The LR schedule still runs locally; its
current lr reaches the store with every push. Optimizer state (momentum buffers, Adam
moments, step) lives with each shard in the owner's window and is identical to what one
optimizer over the whole model would hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..options import opt
from . import kvstore
from .base import register
from .helpers import FlatParams


@dataclass(frozen=True)
class Options:
    servers: int = opt(0, min=0, help="dedicated parameter-server ranks (0 = shards on every rank)")
    timeout_s: float = opt(0.0, min=0.0, help="give up waiting for the store after this long (0 = never)")


@dataclass(frozen=True)
class SSPOptions(Options):
    staleness: int = opt(3, min=0, max=1000, help="clocks a worker may run ahead of the slowest (0 = ps_sync)")


@dataclass(frozen=True)
class AsyncOptions(Options):
    dc_lambda: float = opt(0.0, min=0.0, help="DC-ASGD delay compensation (0 = off; paper: 0.04)")


def _store(kind: str, options, job, workers) -> kvstore.KVStore:
    """Collective over the whole job: the store, sharded over all ranks or the servers."""
    return kvstore.create(job, kind, staleness=getattr(options, "staleness", 0),
                          dc_lambda=getattr(options, "dc_lambda", 0.0), servers=options.servers,
                          workers=workers, timeout=options.timeout_s or None)


def server_roles(cls, options, world, log=None):
    """Collective: with servers = k > 0 the last k ranks only host the store (they get
    (None, serve)); the others train in a sub-world whose parent is the whole job."""
    k = options.servers
    if k == 0:
        return world, None

    def check():
        if k >= world.size:
            raise UserError(f"sync.{cls.name}.servers = {k} leaves no worker among {world.size} ranks")
    world.agree(check)
    is_server = world.rank >= world.size - k
    sub = world.split(1 if is_server else 0)
    if not is_server:
        return sub, None

    def serve():
        """Agree on the workers' set-up, host the shards, return when the workers close
        the store. Workers apply updates themselves (one-sided), so a server only keeps
        its windows reachable (progress thread)."""
        world.raise_any(None)  # the workers' set-up succeeded (else: their error, here too)
        kv = _store(cls.KIND, options, world, None)
        kv.init("params", torch.empty(0))
        if log and sub.is_root:
            log.info(f"server ranks {world.size - k}..{world.size - 1}: hosting the parameters")
        kv.close()
    return None, serve


class _StoreStrategy:
    """Shared by the three registered store strategies below, which differ only in the
    store type (KIND) and their Options."""

    KIND = "dist_sync"
    sums_gradients = True  # each push is this rank's share of the global-batch mean
    replicas_differ = False  # consolidated() pulls the store's parameters; nothing of a rank's own to keep
    remote_update = True  # the store applies the optimizer

    def __init__(self, options, world, log=None):
        self.options, self.world, self.log = options, world, log

    def setup(self, model, optimizer, resources):
        self.world.broadcast_module(model)
        self.flat = FlatParams(model)
        if self.flat.data.is_cuda:
            raise UserError(f"sync.strategy = {self.name!r} keeps parameters in host RMA windows: "
                            "use train.device = 'cpu'")
        self.optimizer = optimizer
        # summed (sync, ssp) the 1/N shares are one synchronous step; applied one by one
        # (async) a round of N pushes moves the parameters as far as one synchronous step
        self.store_opt = kvstore.StoreOptimizer.from_torch(optimizer, rescale=1.0)
        job = self.world.parent or self.world
        self.kv = _store(self.KIND, self.options, job, self.world)
        resources.callback(self.kv.close)
        self.kv.set_optimizer(self.store_opt)
        self.kv.init("params", self.flat.data)
        if self.log and self.world.is_root:
            where = (f"{self.options.servers} dedicated server ranks" if self.options.servers
                     else f"all {self.world.size} ranks")
            self.log.info(f"{self.name}: {self.flat.data.numel():,} parameters in RMA windows on {where}, "
                          f"store-side {self.store_opt.name}")

    def after_backward(self, step):
        self.kv.set_optimizer(dataclasses.replace(self.store_opt, lr=self.optimizer.param_groups[0]["lr"]))
        self.kv.push("params", self.flat.gather_grads(), read_at=self.flat.data)
        self.flat.detach_grads()  # the store applied the optimizer: the local step is a no-op

    def after_step(self, step):
        with torch.no_grad():
            self.kv.pull("params", self.flat.data)
        self.flat.attach_grads()

    @contextlib.contextmanager
    def consolidated(self):
        """Collective: everyone evaluates (or saves) the same, fully applied parameters."""
        self.kv.barrier()
        with torch.no_grad():
            self.kv.pull("params", self.flat.data, fresh=True)
        yield

    def metrics(self) -> dict:
        seen = self.kv.pop_staleness()
        return {"staleness_max": int(max(seen)), "staleness_mean": float(np.mean(seen))} if seen else {}

    def state_dict(self):
        """Collective: the store's values and store-side optimizer state, whole (rank 0)."""
        return self.kv.state_dict()

    def load_state_dict(self, arrays):
        """Reshard a checkpoint's store over this run's owners (any number of ranks)."""
        self.kv.load_state_dict(arrays)
        with torch.no_grad():
            self.kv.pull("params", self.flat.data, fresh=True)


@register("ps_sync", roles=server_roles)
class PSSync(_StoreStrategy):
    """Every step: push gradients, the store sums all N and applies the optimizer once,
    everyone pulls. Numerically the same as `allreduce` with the same optimizer."""

    KIND = "dist_sync"
    Options = Options


@register("ssp", roles=server_roles)
class SSP(_StoreStrategy):
    """Stale-synchronous parallel (Ho et al. 2013): a worker at clock c reads parameters
    that include every update of clocks < c - s (s = staleness); s = 0 is ps_sync."""

    KIND = "dist_ssp"
    Options = SSPOptions


@register("async", roles=server_roles)
class AsyncPS(_StoreStrategy):
    """ASGD / Downpour: push and pull without waiting for anyone; dc_lambda > 0 turns on
    delay compensation (DC-ASGD, λ = 0.04 in the paper). Ranks may run different numbers of
    steps (data.assign = 'dynamic')."""

    KIND = "dist_async"
    Options = AsyncOptions
    uneven_steps = True
