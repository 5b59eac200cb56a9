"""The strategy protocol and registry. train.py talks to strategies only through this."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..errors import UserError


class Strategy(Protocol):
    """How workers share parameters. The training loop calls, per step:
    zero_grad -> forward/backward -> after_backward -> optimizer.step -> after_step."""

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective: make the replicas consistent (e.g. broadcast rank 0's parameters)."""

    def loss_weight(self, global_count: int) -> float:
        """Factor for this rank's summed loss: 1/global_count where gradients are summed
        over ranks, world_size/global_count where each rank steps on its own gradient."""

    def zero_grad(self) -> None:
        """Zero the gradients (strategies may keep them in their own buffers)."""

    def after_backward(self, step: int) -> None:
        """Collective: reduce / push gradients; when it returns .grad is ready to apply."""

    def after_step(self, step: int) -> None:
        """Collective: pull / average parameters after the local optimizer step."""

    def before_eval(self) -> None:
        """Collective: make the local model the one to evaluate (e.g. pull the latest)."""

    def after_eval(self) -> None:
        """Undo what before_eval changed for evaluation only (e.g. EASGD's center)."""

    def metrics(self) -> dict:
        """Per-epoch figures for metrics.jsonl, at least comm_bytes_per_step (sent by
        this rank); called once per epoch."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Collective: strategy state for checkpoints (arrays only; complete on rank 0),
        in a form that does not depend on the world size."""

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """After setup: continue from a checkpoint's strategy state (any world size)."""

    def close(self) -> None:
        """Release threads and communicators."""


REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a strategy selectable as sync.strategy = name."""
    def deco(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def create(cfg, world, log=None) -> Strategy:
    try:
        cls = REGISTRY[cfg.sync.strategy]
    except KeyError:
        raise UserError(f"sync.strategy: unknown strategy {cfg.sync.strategy!r} "
                        f"(known: {', '.join(sorted(REGISTRY))})") from None
    return cls(cfg, world, log)


def roles(cfg, world, log=None):
    """Collective: (training world, None), or on a dedicated server rank (None, serve).

    With sync.servers = k > 0 the last k ranks only host the parameter store; the others
    train in a sub-world whose parent is the whole job."""
    k = cfg.sync.servers
    if k == 0:
        return world, None
    cls = world.agree(_server_class, cfg, world)
    is_server = world.rank >= world.size - k
    sub = world.split(1 if is_server else 0)
    if not is_server:
        return sub, None
    return None, lambda: cls.serve(cfg, world, sub, log)


def _server_class(cfg, world):
    k, cls = cfg.sync.servers, REGISTRY.get(cfg.sync.strategy)
    if cls is None or not hasattr(cls, "serve"):
        raise UserError(f"sync.servers = {k} needs a parameter-server strategy "
                        f"(ps_sync, ssp, async), not {cfg.sync.strategy!r}")
    if k >= world.size:
        raise UserError(f"sync.servers = {k} leaves no worker among {world.size} ranks")
    return cls


def broadcast_model(model: torch.nn.Module, world) -> None:
    """Collective: every rank gets rank 0's parameters and buffers."""
    from ..comm import buffers

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            flat = t.data.contiguous()
            buffers.bcast_(world.comm, flat)
            if flat.data_ptr() != t.data.data_ptr():
                t.data.copy_(flat)
