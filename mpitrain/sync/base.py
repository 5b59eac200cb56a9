"""The strategy protocol and registry: train.py talks to strategies only through this.

A strategy is a class with four methods and three declared attributes:

    @register("local_sgd")
    class LocalSGD:
        Options = LocalSGDOptions     # frozen dataclass, validated from [sync.local_sgd]
        sums_gradients = False        # each rank steps on its own gradient
        replicas_differ = True        # so checkpoints keep every rank's own state
        def __init__(self, options, world, log): ...
        def setup(self, model, optimizer, resources): ...   # Collective
        def after_backward(self, step): ...
        def after_step(self, step): ...
        def consolidated(self): ...                          # Collective context manager

and optionally `state_dict`/`load_state_dict` (`Stateful`: state for checkpoints),
`rank_state_dict`/`load_rank_state_dict` (`RankStateful`: per-rank state for checkpoints) and
`metrics` (`Reporting`: extra per-epoch figures). The per-step order is
forward, backward -> after_backward -> optimizer.step() -> after_step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ClassVar, ContextManager, Protocol, runtime_checkable

import torch

from ..errors import UserError


class Strategy(Protocol):
    Options: ClassVar[type]
    """Frozen dataclass of this strategy's options (fields made with options.opt)."""
    sums_gradients: ClassVar[bool]
    """True: the ranks' gradients are combined every step, so each rank weights its loss
    by 1/(global batch); False: each rank steps on its own gradient (1/(local batch))."""
    replicas_differ: ClassVar[bool]
    """True: between consolidations every rank holds its own parameters and optimizer state
    (local steps); a checkpoint keeps each rank's own next to the consolidated model, so
    that writing one never changes training and a resume at the same world size is exact."""
    uneven_steps: ClassVar[bool]
    """True: ranks may run different numbers of steps (allows data.assign = 'dynamic')."""
    remote_update: ClassVar[bool]
    """True: the update is applied elsewhere (a parameter store), not by the local optimizer."""

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              resources: contextlib.ExitStack) -> None:
        """Collective: make the replicas consistent (e.g. broadcast rank 0's parameters) and
        create what the strategy needs; push its release onto `resources` (closed by the
        caller on every rank, collectively)."""

    def after_backward(self, step: int) -> None:
        """Collective: reduce / push gradients; when it returns, .grad is what to apply."""

    def after_step(self, step: int) -> None:
        """Collective: pull / average parameters after the local optimizer step."""

    def consolidated(self) -> ContextManager[None]:
        """Collective: within the block, the local model is the one to evaluate or save
        (e.g. synchronised, or the EASGD center); leaving it resumes training."""


@runtime_checkable
class Stateful(Protocol):
    """Optional: strategy state that checkpoints carry (read inside `consolidated`): a tree
    (dicts of arrays, nested as the strategy likes), one component of the checkpoint tree."""

    def state_dict(self) -> dict:
        """Collective: a tree of arrays, complete on rank 0, independent of the world size."""

    def load_state_dict(self, tree: dict) -> None:
        """Collective, after setup: continue from a checkpoint's state (any world size)."""


@runtime_checkable
class RankStateful(Protocol):
    """Optional: state that differs between ranks and fits only the world size it was made
    at (e.g. gradient compression's error-feedback residuals). Checkpoints keep every rank's
    own tree under /ranks/<r>/strategy (state the ranks hold alike belongs in state_dict)."""

    def rank_state_dict(self) -> dict:
        """This rank's own tree of arrays; the same keys and shapes on every rank; {} when
        there is nothing to keep. Not collective."""

    def load_rank_state_dict(self, tree: dict | None) -> None:
        """After setup and load_state_dict: continue from a checkpoint. `tree` is this rank's
        as saved at this world size ({} if the checkpoint has none), None when it was saved
        at another world size and is dropped. What is missing or does not fit starts
        afresh. Not collective."""


@runtime_checkable
class Skipping(Protocol):
    """Optional, for strategies whose reduction starts during backward (hooks): a step the
    ranks agreed to skip (a non-finite loss) must still complete what backward started."""

    def skip_step(self, step: int) -> None:
        """Collective, instead of after_backward/after_step on a skipped step: finish or
        discard this step's reductions without applying anything, and leave the state it
        keeps (e.g. compression residuals) as it was before the step."""


@runtime_checkable
class Scaled(Protocol):
    """Optional, for strategies that keep state computed from the gradients (compression
    residuals): told the fp16 loss scale before each backward, to keep that state in the
    gradient's own units."""

    def loss_scale(self, scale: torch.Tensor) -> None:
        """The loss scale of the coming backward's gradients (a 0-dim tensor on their
        device; read without a host sync)."""


@runtime_checkable
class Sharded(Protocol):
    """Optional, for strategies that shard the reduced gradient and the optimizer state over
    the ranks (zero): the optimizer holds only this rank's chunks as its parameters."""

    def grad_sq_norm(self) -> float:
        """Collective: the squared 2-norm of the whole reduced gradient (inf or NaN where
        any rank's chunk is not finite): what clipping and an fp16 overflow check see."""

    def optim_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: the optimizer's state in an unsharded optimizer's layout
        (state.optim_state's tree), each state tensor a checkpoint.Pieces of this rank's
        pieces of it: every rank writes its own, no rank holds all of it (state.save)."""

    def load_optim_state(self, optimizer: torch.optim.Optimizer, tree: dict) -> dict:
        """A checkpoint's /optim tree (unsharded layout, arrays possibly checkpoint.Slab):
        keep this rank's chunks, reading only those; returns the hyperparameters that
        differed (state.optim_groups). Local; before or after setup."""


@runtime_checkable
class NoSync(Protocol):
    """Optional, for strategies that reduce during backward (hooks): gradient accumulation."""

    def no_sync(self) -> ContextManager[None]:
        """Within the block, backward only accumulates gradients locally (no reduction)."""


@runtime_checkable
class Reporting(Protocol):
    """Optional: figures for metrics.jsonl beyond what the loop measures itself."""

    def metrics(self) -> dict[str, float]:
        """This rank's figures since the last call (called once per epoch)."""


Roles = Callable[..., "tuple[object | None, Callable[[], None] | None]"]
REGISTRY: dict[str, type] = {}
ROLES: dict[str, Roles] = {}


def register(name: str, *, roles: Roles | None = None):
    """Class decorator: make a strategy selectable as sync.strategy = name. `roles(cls,
    options, world, log)` (collective) may set ranks aside, e.g. dedicated parameter servers: it
    returns (the training world, None) on training ranks and (None, serve) elsewhere."""
    def deco(cls):
        for attr in ("Options", "sums_gradients", "replicas_differ"):
            if not hasattr(cls, attr):
                raise TypeError(f"strategy {name!r} must declare {attr}")
        cls.name = name
        cls.uneven_steps = getattr(cls, "uneven_steps", False)
        cls.remote_update = getattr(cls, "remote_update", False)
        REGISTRY[name] = cls
        if roles is not None:
            ROLES[name] = roles
        return cls
    return deco


def create(spec, world, log=None) -> Strategy:
    """The strategy named by spec.strategy (a validated SyncCfg), built with its options."""
    try:
        cls = REGISTRY[spec.strategy]
    except KeyError:
        raise UserError(f"sync.strategy: unknown strategy {spec.strategy!r} "
                        f"(known: {', '.join(sorted(REGISTRY))})") from None
    return cls(spec.options, world, log)


def roles(spec, world, log=None):
    """Collective: (training world, None) on ranks that train, (None, serve) on ranks the
    strategy keeps for itself."""
    fn = ROLES.get(spec.strategy)
    return fn(REGISTRY[spec.strategy], spec.options, world, log) if fn else (world, None)
