"""`mpitrain bench e2e`: a job's own training step against one process and torch DDP.

Collective. On the job's model, data, loss, optimizer (and LR schedule, clipping, gradient
accumulation) and per-rank batch B, in one invocation:

- mpitrain: the step of `mpitrain train` (the Job's step.Step: forward and backward of the
  micro-batches, the agreement, the strategy's after_backward / after_step, the optimizer
  and schedule steps) on a Job made by train.build, once per precision (`--set train.precision=...`: one Job each), batches
  from the Job's sampler in order, across epochs;
- one process: rank 0 alone, on all the cores the job has on its node, the same model
  (a copy of the Job's initial one) and optimizer on the global batch G = N * B of each
  step: the ranks' sampler batches of that step joined in rank order, read from the whole
  training split that rank 0 loads once; the other ranks sleep meanwhile;
- torch DDP over gloo: the same model and optimizer on each rank's same sampler batches.

Step times are the slowest rank's; variants run in interleaved rounds (warm-up steps
first, one untimed step when a later round switches variant) and the median round is
reported. No evaluation, no checkpoints; the run folder train.build insists on is a
temporary folder, removed at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import shutil
import signal
import statistics
import tempfile

import numpy as np
import torch

from .. import config, train
from ..data import hdf5
from ..data.loader import to_device
from ..data.sampler import DistributedSampler
from ..errors import AgreedError, UserError
from ..faults import collective_cleanup, stop_flag
from ..models import build_optimizer, build_schedule, model_id
from ..step import micro_batches
from .timing import Variant, header, init_gloo, node_cores, time_rounds

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
GOAL_SINGLE, GOAL_DDP = 1.5, 0.8


def _check_args(args) -> list[str]:
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if not precisions or bad or len(set(precisions)) != len(precisions):
        raise UserError(f"--precision {args.precision!r}: expected a comma-separated list of "
                        f"{' and '.join(PRECISIONS)}, each once")
    for name, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--repeats", args.repeats, 1)):
        if value < low:
            raise UserError(f"{name} {value}: expected an integer >= {low}")
    return precisions


def _check_job(cfg) -> None:
    if cfg.data.assign == "dynamic":
        raise UserError(f"bench e2e: data.assign = 'dynamic' ({cfg.output.name}): ranks run different numbers "
                        "of steps, so there is no common step to time; use data.assign = 'static'")
    servers = getattr(cfg.sync.options, "servers", 0)
    if servers:
        raise UserError(f"bench e2e: sync.{cfg.sync.strategy}.servers = {servers}: dedicated server ranks are "
                        "not supported (set it to 0)")


def run(args, world, log) -> None:
    precisions = world.agree(_check_args, args)
    cfg = world.agree(config.load, args.job, args.overrides)
    world.agree(_check_job, cfg)
    tmp = world.bcast(tempfile.mkdtemp(prefix="mpitrain-bench-e2e-") if world.is_root else None)
    with collective_cleanup() as resources:
        if world.is_root:
            resources.callback(shutil.rmtree, tmp, ignore_errors=True)
        _measure(args, world, log, precisions, tmp, resources)


def _measure(args, world, log, precisions, tmp, resources) -> None:
    # the job's own Job per precision; nothing of the run is kept (temporary run folder)
    extra = [f"output.dir={tmp!r}", "train.progress=false", "train.resume=never", "output.checkpoint_every=0"]
    jobs = {}
    for p in precisions:
        cfg = world.agree(config.load, args.job, [*args.overrides, *extra, f"train.precision={p}"])
        jobs[p] = world.agree(train.build, cfg, world, log, resources)
    job = jobs[precisions[0]]
    cfg, sampler, device = job.cfg, job.sampler, job.device
    initial = copy.deepcopy(job.model)  # before any strategy hooks; every Job starts from these weights
    for j in jobs.values():
        j.strategy.setup(j.model, j.optimizer, resources)
    torch.manual_seed(cfg.train.seed * 7919 + world.rank)  # per-rank stream (dropout), as train.resume does
    threads = train.configure_threads(0, world)
    cores = node_cores(world)
    accumulate = cfg.train.accumulate
    steps_per_epoch = -(-sampler.steps_per_epoch // accumulate)  # optimizer steps

    def optimizer_for(model):
        opt = build_optimizer(cfg.optim, model.parameters(), world.size)
        return opt, build_schedule(cfg.optim, opt, steps_per_epoch, cfg.train.epochs)

    full = None if args.no_single else _full_split(cfg, world)
    if not args.no_ddp:
        init_gloo(world)
        resources.callback(torch.distributed.destroy_process_group)

    variants = []
    for p in precisions:
        j = jobs[p]
        variants.append(Variant(f"mpitrain ({cfg.sync.strategy})", j.model, mpitrain_step(j), kind="mpitrain",
                                precision=p, stream=groups(sampler, accumulate), device=device))
        if not args.no_single:
            model = opt = sched = None
            if world.is_root:
                model = copy.deepcopy(initial)
                opt, sched = optimizer_for(model)
            variants.append(Variant(f"one process ({len(cores)} threads)", model,
                                    single_step(model, opt, sched, job, full, PRECISIONS[p]), kind="single",
                                    precision=p, stream=_global_groups(sampler, accumulate), device=device))
        if not args.no_ddp:
            ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(initial))
            opt, sched = optimizer_for(ddp)
            variants.append(Variant("torch DDP (gloo)", ddp.module, _ddp_step(ddp, opt, sched, job, PRECISIONS[p]),
                                    kind="ddp", precision=p, stream=groups(sampler, accumulate), device=device))

    n_params = sum(t.numel() for t in job.model.parameters())
    header(world, "e2e", threads)
    if world.is_root:
        B = cfg.train.batch_size
        print(f"# job {args.job}: {model_id(cfg.model)} ({cfg.model.factory or cfg.model.name}), {n_params:,} params, "
              f"{cfg.optim.name}, sync {cfg.sync.strategy}, {cfg.data.mode} data ({sampler.n} train samples, "
              f"shuffle {sampler.shuffle})")
        print(f"# N = {world.size} ranks, B = {B}/rank" + (f" x {accumulate} micro-batches" if accumulate > 1 else "")
              + f", G = {world.size * B * accumulate} global per step, {steps_per_epoch} steps/epoch; "
              f"mpitrain{'' if args.no_ddp else ' and DDP'}: {threads} thread(s)/rank"
              + ("" if args.no_single else f"; one process: {len(cores)} threads on rank 0")
              + f"; {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} rounds, median round")

    rounds = time_rounds(variants, args, world, cores)
    if world.is_root:
        _report(variants, rounds, steps_per_epoch, steps=args.warmup + args.repeats * args.steps + args.repeats - 1)


def _report(variants, rounds, steps_per_epoch: int, steps: int) -> None:
    ms = {id(v): statistics.median(x[0] for x in rounds[id(v)]) for v in variants}
    rate = {id(v): statistics.median(x[1] for x in rounds[id(v)]) for v in variants}
    ref = {(v.kind, v.precision): v for v in variants}
    print("| variant | precision | ms/step | samples/s (global) | time/epoch (s) | x one-process | step time vs DDP |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        single, ddp = ref.get(("single", v.precision)), ref.get(("ddp", v.precision))
        x_single = f"{rate[id(v)] / rate[id(single)]:.2f}" if single else "-"
        vs_ddp = f"{ms[id(v)] / ms[id(ddp)]:.2f}" if ddp else "-"
        print(f"| {v.label} | {v.precision} | {ms[id(v)]:.2f} | {rate[id(v)]:.0f} | "
              f"{steps_per_epoch * ms[id(v)] / 1e3:.1f} | {x_single} | {vs_ddp} |")
    mine = ref.get(("mpitrain", "fp32"))
    for kind, goal, what in (("single", GOAL_SINGLE, "samples/s vs one process"),
                             ("ddp", GOAL_DDP, "step time vs DDP")):
        base = ref.get((kind, "fp32"))
        if mine is None or base is None:
            why = "fp32 not in --precision" if mine is None else f"--no-{kind}"
            print(f"# goal {'>=' if kind == 'single' else '<='} {goal}x {what} (fp32): not measured ({why})")
            continue
        ratio = rate[id(mine)] / rate[id(base)] if kind == "single" else ms[id(mine)] / ms[id(base)]
        met = ratio >= goal if kind == "single" else ratio <= goal
        print(f"# goal {'>=' if kind == 'single' else '<='} {goal}x {what} (fp32): {ratio:.2f}x "
              f"{'MET' if met else 'NOT MET'}")
    diffs = []
    for v in variants:
        base = ref[("mpitrain", v.precision)]
        if v is not base and v.model is not None:
            d = max((a.detach() - b.detach()).abs().max().item()
                    for a, b in zip(base.model.parameters(), v.model.parameters()))
            diffs.append(f"{v.kind} {v.precision} {d:.1e}")
    if diffs:
        dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in variants[0].model.modules())
        print(f"# max |parameter difference| to mpitrain (same precision) after {steps} steps on the same "
              f"batches{' (dropout draws differ)' if dropout else ''}: {', '.join(diffs)}")


def groups(sampler, accumulate: int):
    """This rank's steps (groups of sampler batches), epoch after epoch."""
    for epoch in itertools.count():
        yield from micro_batches(sampler.epoch(epoch), accumulate)


def _global_groups(sampler, accumulate: int):
    """The same steps as every rank's `groups`, each micro-batch the ranks' shares of it
    joined in rank order (global sample indices)."""
    ranks = [DistributedSampler(sampler.n, sampler.size, r, sampler.batch, sampler.seed, sampler.shuffle)
             for r in range(sampler.size)]
    for epoch in itertools.count():
        joined = (np.concatenate([b.indices for b in shares]) for shares in zip(*(s.epoch(epoch) for s in ranks)))
        yield from micro_batches(joined, accumulate)


def mpitrain_step(job):
    """One optimizer step as train.loop takes it: the Job's Step (without checkpoints,
    metrics, progress)."""
    stop = stop_flag()

    def step(group) -> int:
        count = sum(b.global_count for b in group)
        out = job.step([lambda b=b: to_device(job.train_split.take(b.indices), job.device) for b in group], count,
                       stop)
        if out.signum:  # every rank has it (agreed): leave cleanly with 128 + signal
            err = AgreedError(f"bench e2e: stopped by {signal.Signals(out.signum).name} (nothing written)")
            err.exit_code = 128 + out.signum
            raise err
        return count
    return step


def _ddp_step(ddp, optimizer, schedule, job, precision):
    """DDP averages the ranks' gradients: each rank's summed loss x N / global batch makes
    the mean over the global batch, as mpitrain's loss weighting does."""
    clip, n = job.cfg.optim.clip_norm, job.world.size

    def step(group) -> int:
        optimizer.zero_grad(set_to_none=False)
        count = sum(b.global_count for b in group)
        for i, b in enumerate(group):
            x, y = (torch.from_numpy(t).to(job.device) for t in job.train_split.take(b.indices))
            with ddp.no_sync() if i < len(group) - 1 else contextlib.nullcontext():
                with torch.autocast(job.device.type, dtype=precision, enabled=precision is not None):
                    loss = job.loss(ddp(x), y)
                (loss * (n / count)).backward()
        _apply(ddp.parameters(), optimizer, schedule, clip)
        return count
    return step


def single_step(model, optimizer, schedule, job, split, precision):
    """Rank 0 alone: the global batch's mean loss, one optimizer step (None elsewhere)."""
    if model is None:
        return None
    clip = job.cfg.optim.clip_norm

    def step(group) -> int:
        optimizer.zero_grad(set_to_none=False)
        count = sum(len(idx) for idx in group)
        for idx in group:
            x, y = (torch.from_numpy(t).to(job.device) for t in split.take(idx))
            with torch.autocast(job.device.type, dtype=precision, enabled=precision is not None):
                loss = job.loss(model(x), y)
            (loss / count).backward()
        _apply(model.parameters(), optimizer, schedule, clip)
        return count
    return step


def _apply(params, optimizer, schedule, clip: float) -> None:
    """A baseline's update: clip (if set), step, schedule."""
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    schedule.step()


def _full_split(cfg, world):
    """Collective: the whole training split on rank 0 (read through a one-rank world, no
    test split), None elsewhere."""
    sub = world.split(0 if world.is_root else 1)
    data = dataclasses.replace(cfg.data, test="", mode="replicated")
    try:
        return world.agree(lambda: hdf5.load(data, sub)[0] if world.is_root else None)
    finally:
        sub.free()


