"""Your own training loop with mpitrain's strategies, the way Horovod wraps an optimizer:

    world = mpitrain.init()
    model, optimizer = mpitrain.distribute(model, optimizer, strategy="local_sgd", period=4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)  # takes it directly
    data = mpitrain.Loader("data/digits/digits.h5", world, batch_size=32)
    for epoch in range(epochs):
        for x, y in data.epoch(epoch):
            optimizer.zero_grad()
            optimizer.backward(F.cross_entropy(model(x), y))  # the mean over this rank's batch
            optimizer.step()                                  # reduce / push, step, average / pull
            schedule.step()
        with optimizer.consolidated():                        # the model to evaluate
            ...
        mpitrain.save(f"ckpt-{epoch}.h5", model, optimizer, epoch=epoch + 1)  # Collective
    optimizer.close()                                         # Collective

`distribute` returns the user's optimizer as an instance of a subclass of its own class
(`isinstance(optimizer, torch.optim.SGD)` holds; state_dict, param_groups and LR schedulers
work as before) whose step is mpitrain's one training step (mpitrain/step.py): the same
step `mpitrain train` takes, with its options as keyword arguments (accumulate, clip_norm,
precision, on_nonfinite), validated like a job file's. `optimizer.backward(loss)` replaces
`loss.backward()`: it weights the loss for the strategy (losses are the mean over each
rank's own batch, as with DDP), scales it for fp16 and holds the reduction back until the
last of `accumulate` micro-batches. Any registered strategy works; its options are keyword
arguments (validated like the `[sync.<strategy>]` table of a job file). `save` and
`restore` are the command line's checkpoints: a checkpoint of your loop resumes under
`mpitrain train` and the other way round.

On GPUs, `init()` makes each rank's own GPU (local rank % GPUs on the node) its current
CUDA device, so `model.to("cuda")` and `Loader(..., device="cuda")` mean that rank's GPU,
and `distribute` uses the CUDA path the job agreed on (World.select_device).
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import torch

from . import state
from .comm import World
from .config import OptimCfg, TrainCfg
from .data.loader import Loader  # noqa: F401  (mpitrain.Loader)
from .errors import AgreedError, UserError
from .faults import Watchdog, env_timeout, watchdog
from .options import build
from .precision import Precision
from .step import Step
from .sync.helpers import average_buffers

_WORLD: World | None = None
_DISTRIBUTED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models with a live distribution


DEVICES = ("auto", "cuda", "cpu")


def init(device: str = "auto") -> World:
    """Collective (the first time): the job's World (every rank of COMM_WORLD), its device
    chosen as `mpitrain train` chooses it (World.select_device; `device` as train.device):
    on a GPU node each rank's own GPU (local rank % GPUs) becomes its current CUDA device,
    so `model.to("cuda")` lands there, and the job agrees on the CUDA path (MPI gets device
    buffers only if every rank's library is CUDA-aware, else pinned-host staging)."""
    global _WORLD
    if device not in DEVICES:
        raise UserError(f"mpitrain.init(device={device!r}): expected one of {', '.join(DEVICES)}")
    if _WORLD is None:
        world = World.create()
        world.select_device(device)
        _WORLD = world
    return _WORLD


def _select_device(world: World, device: torch.device) -> None:
    """Collective: select the model's kind of device on every rank (World.select_device:
    this rank's GPU current, the CUDA path agreed); a model on one kind of device on some
    ranks and another elsewhere, or on another rank's GPU, is one agreed error."""
    kinds = world.allgather(device.type)
    if len(set(kinds)) > 1:
        where = ", ".join(f"rank {r}: {k}" for r, k in enumerate(kinds[:8]))
        raise AgreedError(f"distribute(): the model must be on one kind of device on every rank ({where})")
    mine = world.select_device("cuda" if device.type == "cuda" else "cpu")

    def check():
        if device.type == "cuda" and device != mine:
            raise UserError(f"distribute(): the model is on {device} but this rank's GPU is {mine} (local rank "
                            f"{world.local_rank}): call mpitrain.init() before moving it, then model.to('cuda')")
    world.agree(check)


class DistributedOptimizer:
    """Mixed into the user's optimizer class by `distribute`: its `step` is mpitrain's
    training step. Collective: `step` (lockstep strategies), `consolidated`, `close`."""

    _mt_step: Step
    _mt_resources: contextlib.ExitStack

    def _mt_check(self, what: str) -> None:
        if self._mt_closed:
            raise UserError(f"optimizer.{what}() after optimizer.close(): distribute() the model and optimizer again")

    @property
    def steps(self) -> int:
        """Optimizer steps taken (restored by mpitrain.restore)."""
        return self._mt_step.steps

    @property
    def strategy(self):
        return self._mt_step.strategy

    @property
    def world(self) -> World:
        return self._mt_step.world

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (the mean over this rank's batch), weighted for
        the strategy and scaled for fp16; the reduction waits for the last of `accumulate`."""
        self._mt_check("backward")
        k = self._mt_accumulate
        if self._mt_calls == k:
            raise UserError(f"optimizer.backward() called {k + 1} times before optimizer.step() with accumulate={k}")
        self._mt_calls += 1
        self._mt_loss = self._mt_loss + loss.detach().float()
        self._mt_step.backward(loss, self._mt_step.weight(self._mt_step.world.size * k), last=self._mt_calls == k)

    def step(self, closure=None):
        """Collective (lockstep strategies): after `accumulate` backward calls: agree on a
        non-finite loss (stop or skip), reduce or push the gradients, clip, step, then
        average or pull parameters as the strategy does."""
        if self._mt_inner:  # the precision step calls the optimizer's own step: the base class's
            return super().step(closure)
        self._mt_check("step")
        if closure is not None:
            raise UserError("optimizer.step(closure): closures are not supported by mpitrain's step")
        calls, k = self._mt_calls, self._mt_accumulate
        if calls < k:
            raise UserError(f"optimizer.step() after {calls} of accumulate={k} optimizer.backward(loss) calls"
                            + (" (call optimizer.backward(loss), not loss.backward(): it weights the loss for "
                               "the ranks, scales it for fp16 and times the reduction)" if calls == 0 else ""))
        loss = self._mt_loss.item() if torch.is_tensor(self._mt_loss) else float(self._mt_loss)
        if self._mt_step.dog is not None:
            self._mt_step.dog.beat(self._mt_step.steps + 1)
        self._mt_calls, self._mt_loss, self._mt_inner = 0, 0.0, True
        try:
            self._mt_step.finish(loss, 0)
        finally:
            self._mt_inner = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._mt_check("zero_grad")
        if self._mt_calls:
            raise UserError(f"optimizer.zero_grad() after {self._mt_calls} optimizer.backward() call(s) and before "
                            "optimizer.step(): it would drop those gradients (and leave a reduction half done)")
        super().zero_grad(set_to_none=False)

    def consolidated(self):
        """Collective: within the block the local model is the one to evaluate; afterwards
        every rank trains on exactly what it had (evaluating never changes training)."""
        self._mt_check("consolidated")
        average_buffers(self._mt_step.model, self._mt_step.world)  # BatchNorm statistics: one model everywhere
        return state.consolidated(self._mt_step)

    def close(self) -> None:
        """Collective: release the strategy's threads, windows and communicators."""
        if not self._mt_closed:
            self._mt_closed = True
            self._mt_resources.close()


def _distributed(optimizer: torch.optim.Optimizer, step: Step, resources, accumulate: int):
    """The user's optimizer as an instance of DistributedOptimizer + its own class, sharing
    its state, parameter groups and hooks (an LR scheduler made on the original before
    would step the original: make schedulers after distribute)."""
    base = type(optimizer)
    cls = type(base.__name__, (DistributedOptimizer, base), {"__module__": base.__module__,
                                                            "__doc__": base.__doc__})
    opt = cls.__new__(cls)
    opt.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k not in ("step", "zero_grad")})
    opt._mt_step, opt._mt_resources, opt._mt_accumulate = step, resources, accumulate
    opt._mt_calls, opt._mt_loss, opt._mt_inner, opt._mt_closed = 0, 0.0, False, False
    step.optimizer = opt
    return opt


def distribute(model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str = "allreduce", *,
               world: World | None = None, log=None, accumulate: int = 1, clip_norm: float = 0.0,
               precision: str = "fp32", on_nonfinite: str = "stop", max_skipped: int = 10,
               watchdog_s: float | None = None, **options):
    """Collective: make `model` and `optimizer` train data-parallel with `strategy`
    (rank 0's parameters are broadcast). Returns (model, the optimizer as a
    DistributedOptimizer of its own class). Options are the strategy's own, e.g. period=4;
    accumulate, clip_norm, precision, on_nonfinite, max_skipped and watchdog_s are train.* /
    optim.clip_norm. The job runner's watchdog watches the loop: no progress on any rank for
    `watchdog_s` (default: MPITRAIN_WATCHDOG_S, else 600; 0 = off) ends the job with exit 3,
    naming the ranks that stopped (e.g. one that skipped an optimizer.step())."""
    from .sync import REGISTRY
    from .sync.base import ROLES

    world = world or init()
    if strategy not in REGISTRY:
        raise UserError(f"strategy: unknown strategy {strategy!r} (known: {', '.join(sorted(REGISTRY))})")
    if isinstance(optimizer, DistributedOptimizer):
        raise UserError("distribute(): this optimizer is distributed already")
    if ROLES.get(strategy) and options.get("servers"):
        raise UserError(f"strategy {strategy!r} with dedicated servers needs the job runner (mpitrain train)")
    cls = REGISTRY[strategy]
    opts = build(cls.Options, options, "distribute()", f"sync.{strategy}")
    if watchdog_s is None:
        watchdog_s = env_timeout()
    t = build(TrainCfg, {"accumulate": accumulate, "precision": precision, "on_nonfinite": on_nonfinite,
                         "max_skipped": max_skipped, "watchdog_s": watchdog_s}, "distribute()", "train")
    clip = build(OptimCfg, {"clip_norm": clip_norm}, "distribute()", "optim").clip_norm
    device = next(model.parameters()).device
    if t.precision == "fp16" and device.type != "cuda":
        raise UserError("distribute(): precision = 'fp16' needs a model on a GPU; on CPUs use 'bf16'")
    if device.type == "cuda" and cls.remote_update:
        raise UserError(f"distribute(): strategy {strategy!r} keeps the parameters in host RMA windows: "
                        "keep the model on the CPU")
    if model in _DISTRIBUTED:
        raise UserError("distribute(): this model is distributed already (with another optimizer): close() that "
                        "optimizer first, or distribute the model once")
    _select_device(world, device)  # collective: this rank's GPU, the agreed CUDA path
    resources = contextlib.ExitStack()
    dog = watchdog()
    if dog is None and t.watchdog_s > 0:  # none runs (the command line starts one): watch this loop
        dog = Watchdog(t.watchdog_s, world)
        dog.enter("training")
        resources.callback(dog.close)
    _DISTRIBUTED.add(model)
    resources.callback(_DISTRIBUTED.discard, model)
    try:
        strat = world.agree(cls, opts, world, log)
        strat.setup(model, optimizer, resources)
    except BaseException as e:
        if getattr(e, "agreed", False):  # every rank is here: release what setup made, collectively
            resources.close()
        raise
    step = Step(model, optimizer, strat, Precision(t.precision, device, world, reduced=cls.sums_gradients), world,
                clip_norm=clip, on_nonfinite=t.on_nonfinite, max_skipped=t.max_skipped, dog=dog, log=log)
    return model, _distributed(optimizer, step, resources, t.accumulate)


def _ours(model: torch.nn.Module, optimizer) -> Step:
    if not isinstance(optimizer, DistributedOptimizer):
        raise UserError("expected the optimizer that mpitrain.distribute() returned")
    optimizer._mt_check("save/restore")
    if model is not optimizer._mt_step.model:
        raise UserError("the model is not the one distributed with this optimizer")
    return optimizer._mt_step


def save(path: str, model: torch.nn.Module, optimizer: DistributedOptimizer, *, step: int | None = None,
         epoch: int = 0, samples_in_epoch: int = 0) -> str:
    """Collective: an mpitrain checkpoint (HDF5, atomic, checksummed; the command line's
    format and writer, state.save) of model, optimizer, strategy, precision and every
    rank's random state at `step` (default: the steps taken); rank 0 writes it."""
    s = _ours(model, optimizer)
    pos = state.Position(s.steps if step is None else step, epoch, samples_in_epoch)
    return state.save(Path(path), s, pos, {})


def restore(path: str, model: torch.nn.Module, optimizer: DistributedOptimizer) -> int:
    """Collective: load a checkpoint (this API's or `mpitrain train`'s, verified first) into
    the model, the optimizer, the strategy and the random generators, at any world size;
    returns the saved step."""
    s = _ours(model, optimizer)
    tree = state.load(path, s.world)
    s.world.agree(state.check_position, tree, s.precision.device)
    pos = s.world.agree(state.restore, s, tree)
    state.restore_strategy(s, tree)
    state.restore_rng(tree, s.world.rank, s.precision.device)
    return pos.step
