"""Your own training loop with mpitrain's strategies, the way Horovod wraps an optimizer:

    world = mpitrain.init()
    model, optimizer = mpitrain.distribute(model, optimizer, strategy="local_sgd", period=4)
    data = mpitrain.Loader("data/digits/digits.h5", world, batch_size=32)
    for epoch in range(epochs):
        for x, y in data.epoch(epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()    # the mean over this rank's batch
            optimizer.step()                           # reduce / push, step, average / pull
        with optimizer.consolidated():                 # the model to evaluate or save
            ...
    mpitrain.save("ckpt.h5", model, optimizer, step=...)
    optimizer.close()                                  # Collective

Any registered strategy works; its options are keyword arguments (validated like the
`[sync.<strategy>]` table of a job file). Losses are the mean over each rank's own batch,
as with DDP: where a strategy combines the ranks' gradients, every gradient is divided by
the number of ranks on its way (a tensor hook), so the sum over ranks is the global mean.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import __version__, checkpoint
from .comm import World
from .data import hdf5
from .data.sampler import DistributedSampler
from .errors import UserError
from .options import build
from .sync.helpers import average_buffers
from .train import to_device

_WORLD: World | None = None


def init() -> World:
    """Collective (the first time): the job's World (every rank of COMM_WORLD)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = World.create()
    return _WORLD


class DistributedOptimizer:
    """The user's optimizer with a strategy around its step. Collective to `close`."""

    def __init__(self, optimizer: torch.optim.Optimizer, strategy, world, resources: contextlib.ExitStack,
                 model: torch.nn.Module | None = None):
        self.optimizer, self.strategy, self.world, self.model = optimizer, strategy, world, model
        self._resources = resources
        self.steps = 0

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Collective (for lockstep strategies): reduce or push the gradients, step the
        optimizer, then average or pull parameters as the strategy does."""
        self.strategy.after_backward(self.steps)
        self.optimizer.step()
        self.strategy.after_step(self.steps)
        self.steps += 1

    def consolidated(self):
        """Collective: within the block the local model is the one to evaluate or save."""
        if self.model is not None:
            average_buffers(self.model, self.world)  # BatchNorm statistics: one model everywhere
        return self.strategy.consolidated()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def close(self) -> None:
        """Collective: release the strategy's threads, windows and communicators."""
        self._resources.close()


def distribute(model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str = "allreduce", *,
               world: World | None = None, log=None, **options) -> tuple[torch.nn.Module, DistributedOptimizer]:
    """Collective: make `model` and `optimizer` train data-parallel with `strategy`
    (rank 0's parameters are broadcast). Options are the strategy's own, e.g. period=4."""
    from .sync import REGISTRY
    from .sync.base import ROLES

    world = world or init()
    if strategy not in REGISTRY:
        raise UserError(f"strategy: unknown strategy {strategy!r} (known: {', '.join(sorted(REGISTRY))})")
    if ROLES.get(strategy) and options.get("servers"):
        raise UserError(f"strategy {strategy!r} with dedicated servers needs the job runner (mpitrain train)")
    cls = REGISTRY[strategy]
    opts = build(cls.Options, options, "distribute()", f"sync.{strategy}")
    if cls.sums_gradients and world.size > 1:  # the ranks' SUM of local-mean gradients / N = the global mean
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g, n=world.size: g / n)
    resources = contextlib.ExitStack()
    strat = world.agree(cls, opts, world, log)
    strat.setup(model, optimizer, resources)
    return model, DistributedOptimizer(optimizer, strat, world, resources, model)


class Loader:
    """Collective to create: one split of an mpitrain HDF5 file, and per epoch the batches
    of this rank: every sample exactly once per epoch over all ranks, deterministic from
    (seed, epoch). `mode="partitioned"` reads only this rank's shard (collective mpio reads)
    and shuffles within it; "replicated" reads all and shuffles globally. Token streams
    need `seq_len` (windows of seq_len inputs and the next seq_len tokens as targets)."""

    def __init__(self, path: str, world: World, batch_size: int, *, split: str = "train", mode: str = "replicated",
                 seed: int = 0, device: str | torch.device = "cpu", seq_len: int = 0):
        from .config import DataCfg

        cfg = DataCfg(path=str(path), mode=mode, train=split, test="", seq_len=seq_len)
        self.data, _, self.meta = hdf5.load(cfg, world)
        self.device = torch.device(device)
        self.sampler = DistributedSampler(self.data.total, world.size, world.rank, batch_size, seed,
                                          "global" if mode == "replicated" else "shard")

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int):
        """(x, y) tensors for every step of `epoch` (the same number of steps on every rank;
        the last batches may be smaller or, on some ranks, empty)."""
        for batch in self.sampler.epoch(epoch):
            yield to_device(self.data.take(batch.indices), self.device)


def save(path: str, model: torch.nn.Module, optimizer: DistributedOptimizer, *, step: int = 0,
         epoch: int = 0) -> None:
    """Collective: an mpitrain checkpoint (HDF5, atomic, checksummed) of the consolidated
    model, rank 0's optimizer state and the strategy's state; rank 0 writes it."""
    from pathlib import Path

    from .state import optimizer_arrays
    from .sync import Stateful

    world, strategy = optimizer.world, optimizer.strategy
    average_buffers(model, world)
    with strategy.consolidated():
        sstate = strategy.state_dict() if isinstance(strategy, Stateful) else {}
        rng = world.gather(torch.get_rng_state().numpy())
        snap = None
        if world.is_root:
            snap = checkpoint.Snapshot(
                step=step, epoch=epoch, samples_in_epoch=0, world_size=world.size, strategy=strategy.name,
                model_name="api", config="", model={k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
                **optimizer_arrays(optimizer.optimizer), strategy_state=sstate, rng=np.stack(rng),
                mpitrain_version=__version__)
        world.on_root(_write, Path(path), snap)


def _write(path, snap):
    try:
        checkpoint.write(path, snap)
    except OSError as e:
        raise UserError(f"{path}: cannot write checkpoint: {e.strerror or e}") from None


def restore(path: str, model: torch.nn.Module, optimizer: DistributedOptimizer) -> int:
    """Collective: load what `save` wrote (verified first) into the model, the optimizer
    and the strategy, at any world size; returns the saved step."""
    from pathlib import Path

    from .state import load_optimizer
    from .sync import Stateful

    world = optimizer.world
    snap = world.agree(checkpoint.read, Path(path))
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in snap.model.items()})
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}: does not fit this model: {e}") from None
    if snap.optimizer_state or snap.param_groups:
        world.agree(load_optimizer, optimizer.optimizer, snap.optimizer_state, snap.param_groups)
    if isinstance(optimizer.strategy, Stateful):
        optimizer.strategy.load_state_dict(snap.strategy_state)
    optimizer.steps = snap.step
    return snap.step
