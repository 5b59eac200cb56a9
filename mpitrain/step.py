"""The training step: the one place an optimizer step is taken. `mpitrain train`'s loop,
`mpitrain bench` and the Python API (mpitrain.distribute) all call a `Step`.

One step, top to bottom (`Step.__call__` for the job runner; the Python API calls the
same `backward` and `finish` from the user's loop):

    zero_grad
    for each micro-batch:                       # train.accumulate of them
        forward and loss under autocast         # train.precision
        backward of loss x weight (x fp16 scale) # the strategy's reduction only after the last (no_sync)
    agree: a stop signal, a non-finite loss     # one tiny allreduce (lockstep strategies); skip_step if so
    strategy.after_backward                     # reduce / push: .grad is what to apply
    unscale, clip, optimizer.step               # precision.step (an fp16 overflow skips it everywhere)
    strategy.after_step                         # average / pull
    schedule.step

The loss convention, in one place (`loss_weight`): a loss summed over `per` units of the
step's global batch is weighted 1/per where the strategy combines the ranks' gradients
(their sum is then the global mean) and N/per where each rank steps on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import trace
from .faults import Diverged
from .sync.base import NoSync, Scaled, Sharded, Skipping


def loss_weight(sums_gradients: bool, world_size: int, per: float) -> float:
    """Factor for a loss summed over `per` units of the step's global batch (samples, or
    the ranks' micro-batch means): its gradient is then this rank's share of the global
    mean where the ranks' gradients are summed, or the local mean where each rank steps on
    its own."""
    return (1.0 if sums_gradients else world_size) / per


def micro_batches(batches, k: int):
    """Batches in groups of k: one optimizer step each (the last may be short)."""
    group = []
    for b in batches:
        group.append(b)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


@dataclass(frozen=True)
class Outcome:
    """What one step did: the summed loss of this rank's samples (0 when skipped), its
    sample count, an agreed stop signal (0 = none) and whether the update was skipped (a
    non-finite loss with on_nonfinite = "skip", or an fp16 overflow)."""

    loss: float
    samples: int
    signum: int = 0
    skipped: bool = False


class Step:
    """Collective (for lockstep strategies): one optimizer step of `model` with `optimizer`
    under `strategy` and `precision`. `steps` counts the steps taken (the strategies' step
    index). `loss_fn(output, target)` is the batch's summed loss (job runner); the Python
    API passes its own losses to `backward`. `schedule` (optional) steps after every step,
    skipped or not; `straggle(t_compute)` (optional) runs between compute and the agreement
    (fault injection); `dog` (optional) is the watchdog told where the step waits."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy, precision, world, *,
                 clip_norm: float = 0.0, on_nonfinite: str = "stop", max_skipped: int = 10, lockstep: bool = True,
                 schedule=None,
                 loss_fn=None, straggle=None, dog=None, log=None, stages=None, tensor=None):
        self.stages = stages  # parallel.stages.Stages: this rank's pipeline stage, or None
        self.tensor = tensor  # parallel.stages.TensorSplit: this rank's tensor-parallel part, or None
        self.model, self.optimizer, self.strategy, self.precision, self.world = model, optimizer, strategy, precision, world
        self.clip_norm, self.on_nonfinite, self.max_skipped, self.lockstep = clip_norm, on_nonfinite, max_skipped, lockstep
        self.skipped_in_a_row = 0  # non-finite losses skipped since the last counted step
        self.schedule, self.loss_fn, self.straggle, self.dog, self.log = schedule, loss_fn, straggle, dog, log
        self.steps = 0

    def weight(self, per: float) -> float:
        return loss_weight(self.strategy.sums_gradients, self.world.size, per)

    def __call__(self, inputs, count: int, stop=None) -> Outcome:
        """The job runner's step: `inputs` yields (x, y) tensors per micro-batch (read when
        needed), `count` is the step's samples over all ranks."""
        tracer = trace.current()
        if self.dog is not None:
            self.dog.beat(self.steps + 1)
        t_compute = time.perf_counter()
        self.zero_grad()
        weight, total, n = self.weight(count), torch.zeros((), device=self.precision.device), 0
        batches = list(inputs)
        if self.stages is not None:
            return self._pipelined(batches, weight, stop, t_compute)
        for i, fetch in enumerate(batches):
            with tracer.span("data"):
                x, y = fetch()
            with self.precision.autocast(), tracer.span("forward"):
                loss = self.loss_fn(self.model(x), y)
            with tracer.span("backward"):
                self.backward(loss, weight, last=i == len(batches) - 1)
            total, n = total + loss.detach().float(), n + len(y)
        value = total.item()  # one device sync per step: the non-finite agreement needs the value
        if self.straggle is not None:
            self.straggle(t_compute)
        out = self.finish(value, n, stop)
        if self.tensor is not None and not self.tensor.counts:  # (the replica's loss, counted once)
            return dataclasses.replace(out, loss=0.0, samples=0)
        return out

    def _pipelined(self, batches, weight: float, stop, t_compute: float) -> Outcome:
        """The step of a pipeline stage: the schedule's forwards and backwards of the
        micro-batches (parallel.pipeline), the strategy reducing during the stage's last
        backward; loss and samples are the last stage's (0 elsewhere)."""
        pipe = self.stages.pipe
        x, y = batches[0]()  # (train.accumulate = 1: the micro-batches are the pipeline's)
        if self.precision.scaler is not None:
            weight = self.precision.scale_tensor() * weight
            if isinstance(self.strategy, Scaled):
                self.strategy.loss_scale(self.precision.scale_tensor())
        quiet = self.strategy.no_sync if isinstance(self.strategy, NoSync) else None
        with self.precision.autocast(), trace.current().span("pipeline"):
            loss = pipe.step(x if pipe.first else None, y if pipe.last else None, weight=weight, no_sync=quiet,
                             reduce=False)
        if self.straggle is not None:
            self.straggle(t_compute)
        out = self.finish(loss, len(y) if pipe.last else 0, stop)
        return out if pipe.last else dataclasses.replace(out, loss=0.0)

    def _sq_norm(self):
        """The squared gradient norm clipping and an fp16 overflow see: the strategy's over
        sharded chunks (zero), summed over a pipeline's stages; None: the optimizer's own."""
        sharded = self.strategy.grad_sq_norm if isinstance(self.strategy, Sharded) else None
        if self.tensor is not None:  # split parameters: each rank's slices; replicated ones counted once
            ts = self.tensor
            return lambda: float(ts.tp.sum(np.array([sum(
                float(p.grad.double().pow(2).sum()) for name, p in self.model.named_parameters()
                if p.grad is not None and (ts.counts or not ts.replicated(name)))]))[0])
        if self.stages is None:
            return sharded
        pipe = self.stages.pipe

        def total():
            local = sharded() if sharded is not None else sum(
                float(p.grad.double().pow(2).sum()) for p in self.model.parameters()
                if p.grad is not None and pipe.owned(p))
            return pipe.grad_sq_norm(local)
        return total

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def backward(self, loss: torch.Tensor, weight: float, last: bool = True) -> None:
        """Backward of one micro-batch's loss x weight (x the fp16 loss scale); before the
        last micro-batch the strategy's reduction waits (no_sync)."""
        quiet = not last and isinstance(self.strategy, NoSync)
        if self.precision.scaler is not None and isinstance(self.strategy, Scaled):
            self.strategy.loss_scale(self.precision.scale_tensor())
        with self.strategy.no_sync() if quiet else contextlib.nullcontext():
            self.precision.scale(loss * weight).backward()

    def finish(self, loss: float, samples: int, stop=None) -> Outcome:
        """Collective: after the last backward: agree on a stop signal and a non-finite loss,
        then reduce, step and average as the strategy does (nothing of a non-finite step is
        applied), then the schedule."""
        tracer, k = trace.current(), self.steps
        with self.dog.waiting(k + 1) if self.dog is not None else contextlib.nullcontext():
            with tracer.span("wait"):
                signum, nonfinite = self.agree(stop, loss)
            overflow = False
            if nonfinite and isinstance(self.strategy, Skipping):
                self.strategy.skip_step(k)
            if not nonfinite:
                with tracer.span("reduce"):
                    self.strategy.after_backward(k)
                    if self.stages is not None:  # gpt's embedding and head, on two stages: summed
                        self.stages.pipe.sum_tied()
                # clips the reduced gradient's norm (the same on every rank); an fp16 overflow
                # skips the step on every rank
                with tracer.span("optimizer"):
                    sq_norm = self._sq_norm()
                    overflow = not self.precision.step(self.optimizer, self.clip_norm, sq_norm)
                    if overflow and isinstance(self.strategy, Skipping):  # fp16: agreed on every rank
                        self.strategy.skip_step(k)
                    self.strategy.after_step(k)
            if self.schedule is not None:
                self.schedule.step()
        self.steps += 1
        return Outcome(0.0 if nonfinite else loss, samples, signum, bool(nonfinite or overflow))

    def agree(self, stop, loss: float) -> tuple[int, bool]:
        """(stop signal, non-finite loss) for this step, agreed over ranks with one tiny
        allreduce when they step in lockstep (else this rank's own; a stop signal is then
        agreed at the epoch end). A non-finite loss stops training (on_nonfinite = "stop")
        before anything of the step is applied, or is skipped on every rank."""
        bad, step, world = not math.isfinite(loss), self.steps, self.world
        signum = stop.signum if stop is not None else 0
        if self.lockstep:  # [any signal, the highest rank with a bad loss + 1]
            signum, bad_rank = world.max(np.array([signum, (world.rank + 1) * bad], dtype=np.float64))
            signum, bad = int(signum), bad_rank > 0
            where = f"rank {int(bad_rank) - 1}" + (" (and maybe others)" if world.size > 1 else "")
        else:
            signum, where = 0, f"rank {world.rank}"
        if bad and self.on_nonfinite == "stop":
            raise Diverged(f"non-finite loss in step {step + 1} on {where}: stopped before applying it",
                           agreed=self.lockstep)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if bad else 0
        if bad and self.max_skipped and self.skipped_in_a_row >= self.max_skipped:
            raise Diverged(f"{self.skipped_in_a_row} consecutive steps up to step {step + 1} had a non-finite loss "
                           f"(last on {where}), all skipped (train.max_skipped = {self.max_skipped}): stopped",
                           agreed=self.lockstep)
        if bad and world.is_root and self.log is not None:
            self.log.warning(f"non-finite loss in step {step + 1} on {where}: update skipped "
                             "(train.on_nonfinite = 'skip')")
        return signum, bool(bad)
