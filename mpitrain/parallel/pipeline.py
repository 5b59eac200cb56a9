"""Pipeline parallelism: a model's blocks split into P stages, one per rank of a pipeline,
micro-batches flowing forward and gradients backward by point-to-point MPI.

    pipe = mpitrain.pipeline(blocks, stages=2, micro_batches=4, schedule="1f1b", loss_fn=F.cross_entropy)
    opt = torch.optim.AdamW(pipe.module.parameters())  # this stage's blocks only
    loss = pipe.step(x, y)                             # x on the first stage, y on the last
    opt.step(); opt.zero_grad()

The world is a grid of D data-parallel replicas x P stages (MPI_Cart_create; a replica's
stages are consecutive ranks, so on one node where they fit). Each step runs the stage's
action list (schedule.py: GPipe or 1F1B), simulated for every stage at set-up, so a
schedule that would deadlock is an error before the first send. Every message carries its
own header (dtype, shape) and is received with MPI_Mprobe / MPI_Mrecv: shapes may change
from batch to batch (a last short batch, another sequence length) with nothing agreed in
advance. A stage whose forward or backward fails sends an error message in place of each
message it still owes, so its neighbours fail with the same one line instead of waiting
(and pass it on): never a hang. The micro-batches' losses are weighted by their share of
the batch, so the gradients equal one process's over the whole batch; with D > 1 each
stage's gradients are then averaged over its D replicas.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..comm import buffers, p2p
from ..comm.p2p import PeerError, isend, recv, send_error
from ..errors import UserError
from .schedule import SCHEDULES, ScheduleError, promised, simulate

ACT, GRAD = 0, 1
EVAL = 32767  # the tag of evaluation activations (in order between two stages; MPI's least tag bound)


class PipelineError(PeerError):
    """A stage failed during a step; every stage of the pipeline raises it."""


def _tag(kind: int, i: int) -> int:
    return 2 * i + kind


def balance(costs: list[float], stages: int) -> list[int]:
    """Block counts per stage (contiguous, at least one each) that minimise the largest
    stage's total cost (dynamic programming over the split points)."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    best = {(0, 0): (0.0, [])}
    for s in range(1, stages + 1):
        for end in range(s, n - (stages - s) + 1):
            options = [(max(best[(s - 1, start)][0], prefix[end] - prefix[start]), best[(s - 1, start)][1] + [end - start])
                       for start in range(s - 1, end) if (s - 1, start) in best]
            best[(s, end)] = min(options, key=lambda o: o[0])
    return best[(stages, n)][1]


def measure(blocks, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds of forward + backward of each block, run in sequence on `sample` (the
    median of `repeats`); what `balance` splits by."""
    costs = []
    x = sample
    for block in blocks:
        times = []
        for _ in range(repeats):
            inp = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = block(inp)
            out.float().sum().backward()
            times.append(time.perf_counter() - t0)
        block.zero_grad(set_to_none=True)
        costs.append(sorted(times)[len(times) // 2])
        x = out.detach()
    return costs


class Pipeline:
    """This rank's stage of a pipeline of `stages` ranks (`comm`: the pipeline's ranks in
    stage order) and the schedule of one step. Collective over the pipeline (and the
    data-parallel group `data`, if given): `step`."""

    def __init__(self, module: torch.nn.Module, comm, *, micro_batches: int,
                 schedule: str = "1f1b", loss_fn=None, data=None, tied=()):
        self.module, self.comm, self.data, self.loss_fn = module, comm, data, loss_fn
        self.tied = list(tied)  # (parameter, communicator of the stages holding a copy of it)
        self.stage, self.stages, self.m = comm.Get_rank(), comm.Get_size(), micro_batches
        self.schedule = schedule
        lists = [SCHEDULES[schedule](s, self.stages, micro_batches) for s in range(self.stages)]
        try:
            self.peak = simulate(lists, micro_batches)  # every stage's list, before any send
        except ScheduleError as e:
            raise UserError(f"pipeline schedule {schedule!r}: {e}") from None
        self.actions = lists[self.stage]
        self.promised = promised(schedule, self.stage, self.stages, micro_batches)
        self.held_peak = 0  # the most micro-batches whose activations this stage held (last step)
        self.broken = ""  # why a step failed: its unmatched error messages make the pipeline unusable
        self._orphans: list = []  # error messages sent in place of owed ones (their buffers live on)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *, weight: float | None = None,
             no_sync=None, reduce: bool = True) -> float:
        """Collective: forward and backward of `micro_batches` micro-batches of (x, y): x
        on the first stage, y on the last (others may pass None). Gradients accumulate into
        this stage's parameters as one process's of the whole batch's mean loss would;
        returns that loss on every stage. The job runner's form: `weight` multiplies each
        micro-batch's loss (a sum over its samples; the return value is then their sum),
        `no_sync()` wraps every backward but the stage's last (its data-parallel strategy
        reduces during that one), and reduce = False leaves the tied parameters' sum and
        the replicas' average to the caller (`sum_tied` after the strategy's reduction)."""
        m, comm = self.m, self.comm
        last_backward = max((k for k, (kind, _) in enumerate(self.actions) if kind == "B"), default=-1)
        if self.broken:
            raise UserError(f"pipeline: an earlier step failed ({self.broken[:120]}): free() it and make a new one")
        inputs, outputs, pending, loss, held, k = {}, {}, [], 0.0, 0, 0
        self.busy = 0.0  # seconds this step spent in forward, loss and backward (the rest: waiting)
        try:
            if (self.first and not torch.is_tensor(x)) or (self.last and not torch.is_tensor(y)):
                raise UserError(f"pipeline stage {self.stage}: step() needs the inputs x on the first stage and "
                                "the targets y on the last, as tensors")
            if (self.first and len(x) < m) or (self.last and len(y) < m) or (self.first and self.last
                                                                            and len(x) != len(y)):
                raise UserError(f"pipeline stage {self.stage}: a batch of {len(x) if self.first else len(y)} "
                                f"{'inputs' if self.first else 'targets'} cannot make {m} micro-batches"
                                + (f" ({len(y)} targets)" if self.first and self.last else ""))
            xs = torch.tensor_split(x, m) if self.first else [None] * m
            ys = torch.tensor_split(y, m) if self.last else [None] * m
            total = len(y) if self.last else 0
            for k, (kind, i) in enumerate(self.actions):
                if kind == "F":
                    inp = xs[i] if self.first else recv(comm, self.stage - 1, _tag(ACT, i))
                    if not self.first and inp.is_floating_point():
                        inp.requires_grad_()
                    out = self._run(f"forward of micro-batch {i}", lambda: self.module(inp))
                    if self.last:
                        part = self._run(f"loss of micro-batch {i}", lambda: self.loss_fn(out, ys[i]))
                        share = len(ys[i]) / total if weight is None else 1.0
                        loss += float(part.detach()) * share
                        out = part * (share if weight is None else weight)
                    else:
                        pending.append(isend(comm, out, self.stage + 1, _tag(ACT, i)))
                    inputs[i], outputs[i] = inp, out
                    held += 1
                    self.held_peak = max(self.held_peak, held)
                else:
                    out = outputs.pop(i)
                    grad = None if self.last else recv(comm, self.stage + 1, _tag(GRAD, i))
                    quiet = no_sync() if no_sync is not None and k != last_backward else contextlib.nullcontext()
                    with quiet:
                        self._run(f"backward of micro-batch {i}", lambda: torch.autograd.backward(out, grad))
                    inp = inputs.pop(i)
                    if not self.first and inp.is_floating_point():
                        pending.append(isend(comm, inp.grad, self.stage - 1, _tag(GRAD, i)))
                    held -= 1
        except (UserError, PeerError) as e:
            self._fail(str(e), k)
            self.broken = str(e)
            raise PipelineError(str(e)) from None
        # this stage's reductions start as soon as its last backward ends (the others drain on)
        if reduce:
            self.sum_tied()
            if self.data is not None and self.data.Get_size() > 1:
                self._average_over_replicas()
        p2p.wait_all(pending)
        return float(comm.bcast(loss, root=self.stages - 1))

    def sum_tied(self) -> None:
        """Collective over the stages sharing a parameter (gpt's embedding and head): each
        copy's gradient becomes their sum."""
        for p, group in self.tied:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buffers.allreduce_(group, p.grad)

    def owned(self, p: torch.nn.Parameter) -> bool:
        """Whether this stage counts `p` (a tied parameter: only on the first stage holding
        it), for the gradient norm and checkpoints."""
        return all(p is not q or group.Get_rank() == 0 for q, group in self.tied)

    def grad_sq_norm(self, local: float) -> float:
        """Collective over the pipeline: the whole model's squared gradient norm from each
        stage's `local` one (its owned parameters)."""
        return float(buffers.allreduce_(self.comm, torch.tensor([local], dtype=torch.float64))[0])

    @torch.no_grad()
    def forward(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Collective over the pipeline: the model's output for x (given on the first
        stage) on the last stage, None elsewhere; no gradients (evaluation)."""
        try:
            inp = x if self.first else recv(self.comm, self.stage - 1, EVAL)
            out = self._run("evaluation forward", lambda: self.module(inp))
        except (UserError, PeerError) as e:  # the next stage fails with the same line, never waits
            if not self.last:
                self._orphans.append(send_error(self.comm, str(e), self.stage + 1, EVAL))
            self.broken = str(e)
            raise PipelineError(str(e)) from None
        if self.last:
            return out
        p2p.wait_all([isend(self.comm, out, self.stage + 1, EVAL)])
        return None

    def _run(self, what: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"pipeline stage {self.stage}: {what} failed: {first}") from None
        finally:
            self.busy += time.perf_counter() - t0

    def _fail(self, message: str, k: int) -> None:
        """Send the error in place of every message this stage still owes from action k on,
        so no neighbour waits for one (they pass it on the same way)."""
        for kind, i in self.actions[k:]:
            if kind == "F" and not self.last:
                self._orphans.append(send_error(self.comm, message, self.stage + 1, _tag(ACT, i)))
            elif kind == "B" and not self.first:
                self._orphans.append(send_error(self.comm, message, self.stage - 1, _tag(GRAD, i)))

    def _average_over_replicas(self) -> None:
        """Each stage's gradients averaged over the data-parallel replicas (one allreduce)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        buffers.allreduce_(self.data, flat)
        flat /= self.data.Get_size()
        pos = 0
        for g in grads:
            g.copy_(flat[pos:pos + g.numel()].view_as(g))
            pos += g.numel()

    def free(self) -> None:
        """Collective: release the communicators. After a failed step the pipeline's own is
        kept, with the error messages still in flight on it (freeing a communicator under
        unmatched sends is what Open MPI crashes on): a small leak, once per failure."""
        for _, group in self.tied:
            group.Free()
        if self.broken:
            _FAILED.append((self.comm, self._orphans))
        else:
            self.comm.Free()
        if self.data is not None:
            self.data.Free()


_FAILED: list = []  # (communicator, error messages in flight) of pipelines whose step failed


def split(blocks, stages: int, sizes: list[int] | None = None, costs: list[float] | None = None) -> list[list]:
    """The blocks of each stage: `sizes` blocks each (a manual split), else balanced by
    `costs` (e.g. `measure`), else by parameter count (+1 per block)."""
    if sizes is None:
        costs = costs or [sum(p.numel() for p in b.parameters()) + 1.0 for b in blocks]
        sizes = balance(costs, stages)
    out, pos = [], 0
    for k in sizes:
        out.append(list(blocks[pos:pos + k]))
        pos += k
    return out


def check(n_blocks: int, world_size: int, stages: int, micro_batches: int, schedule: str,
          sizes: list[int] | None) -> None:
    """UserError (one line naming the key) where a pipeline of these settings cannot be."""
    if schedule not in SCHEDULES:
        raise UserError(f"pipeline: schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not isinstance(stages, int) or stages < 1 or world_size % stages:
        raise UserError(f"pipeline: stages = {stages!r} must divide the world size {world_size}")
    if stages > n_blocks:
        raise UserError(f"pipeline: stages = {stages} is more than the model's {n_blocks} blocks")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise UserError(f"pipeline: micro_batches = {micro_batches!r} must be an integer >= 1")
    if sizes is not None and (len(sizes) != stages or any(not isinstance(k, int) or k < 1 for k in sizes)
                              or sum(sizes) != n_blocks):
        raise UserError(f"pipeline: split = {sizes!r} must give each of the {stages} stages at least one block, "
                        f"{n_blocks} in all")



def pipeline(blocks, *, stages: int, micro_batches: int, schedule: str = "1f1b", loss_fn=None,
             split_sizes: list[int] | None = None, sample: torch.Tensor | None = None, world=None) -> Pipeline:
    """Collective: this rank's stage of `blocks` (a list of modules or an nn.Sequential,
    built alike on every rank) split into `stages` stages over the world's ranks (D = N /
    stages data-parallel replicas): by `split_sizes` blocks per stage, else balanced by
    each block's forward + backward time on `sample` as rank 0 measures it, else by
    parameter count. Every rank decides every setting alike before the first send; a bad
    one is one agreed line."""
    from ..api import init

    world = world or init()
    blocks = list(blocks)

    def settle():
        check(len(blocks), world.size, stages, micro_batches, schedule, split_sizes)
        if loss_fn is None:
            raise UserError("pipeline: loss_fn is needed (the last stage computes the loss)")
        return measure(blocks, sample) if sample is not None and world.is_root else None
    costs = world.bcast(world.agree(settle))
    parts = split(blocks, stages, split_sizes, costs)
    pipe, data = p2p.grid(world.comm, stages)  # a pipeline's stages are consecutive ranks
    module = torch.nn.Sequential(*parts[pipe.Get_rank()])
    return Pipeline(module, pipe, micro_batches=micro_batches, schedule=schedule, loss_fn=loss_fn, data=data,
                    tied=tie(parts, pipe))


def tie(parts: list[list], pipe) -> list:
    """Collective over the pipeline: for each parameter that blocks of several stages
    share (the same object in the block list every rank built), this stage's copy and a
    communicator of those stages, to sum its gradient over them; in parameter order, the
    same on every rank."""
    holders: dict[int, tuple[torch.nn.Parameter, set]] = {}
    for s, blocks in enumerate(parts):
        for b in blocks:
            for p in b.parameters():
                holders.setdefault(id(p), (p, set()))[1].add(s)
    out, me = [], pipe.Get_rank()
    for p, stages in holders.values():
        if len(stages) < 2:
            continue
        group = p2p.subgroup(pipe, me in stages)
        if group is not None:
            out.append((p, group))
    return out
