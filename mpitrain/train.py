"""The training loop: strategy-agnostic, readable top to bottom."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, files, state, sync, trace
from .config import Config
from .data import hdf5
from .data.sampler import DistributedSampler, DynamicSampler
from .errors import UserError
from .faults import (Diverged, StopFlag, Stopped, Watchdog, collective_cleanup, inject_straggler, signal_name,
                     stop_flag, watchdog)
from .metrics import MetricsLog, open_tensorboard, reset as reset_metrics
from .parallel.stages import split_model, split_tensor
from .models import build_model, build_optimizer, build_schedule, model_id
from .precision import Precision
from .progress import bar
from .data.loader import to_device
from .step import Step, micro_batches
from .sync.helpers import average_buffers
from .tasks import Metric, build_loss, check_model_and_loss, evaluate


def configure_threads(threads: int, world) -> int:
    """torch intra-op threads: `threads`, or (0) the cores this rank should use."""
    n = threads or world.cores_per_rank()
    torch.set_num_threads(n)
    return n


def shuffle_of(data) -> str:
    """The sampler's shuffle for data.shuffle (auto: global when replicated, else shard)."""
    if data.shuffle == "auto":
        return "global" if data.mode == "replicated" else "shard"
    return data.shuffle


def prepare_run_dir(cfg: Config, world) -> Path:
    """Collective: rank 0 creates the run folder and writes the resolved config."""
    run_dir = cfg.run_dir

    def make():
        if world.is_root:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                files.replace_text(run_dir / "config.toml", cfg.dumps())
                os.close(files.open_fd(run_dir / "metrics.jsonl", append=True))
            except OSError as e:
                raise UserError(f"output.dir: cannot write to {run_dir}: {e.strerror}") from None
    world.agree(make)
    return run_dir


@dataclass
class Job:
    """Everything a run needs, built (and validated) before the first step."""

    cfg: Config
    world: object  # comm.World
    log: object  # logging.Logger
    device: torch.device
    threads: int
    run_dir: Path
    train_split: hdf5.Split | hdf5.TokenSplit
    test_split: hdf5.Split | hdf5.TokenSplit | None
    model: torch.nn.Module
    loss: object  # (output, target) -> the batch's summed loss
    metric: Metric
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler | DynamicSampler
    schedule: torch.optim.lr_scheduler.LRScheduler
    strategy: sync.Strategy
    precision: Precision
    step: Step  # the training step: the components above, put together
    metrics: MetricsLog  # rank 0 writes metrics.jsonl (and TensorBoard event files)
    meta: hdf5.Meta  # what the data says about the model (input shape, classes, vocabulary)


def _raise(message: str):
    raise UserError(message)


def build(cfg: Config, world, log, resources) -> Job:
    """Collective: validate and build the job; any UserError is agreed on by all ranks."""
    threads = configure_threads(cfg.train.threads, world)
    device = world.select_device(cfg.train.device)  # collective: one kind of device, one CUDA path
    run_dir = prepare_run_dir(cfg, world)
    board = world.agree(open_tensorboard, run_dir / "tensorboard" if world.is_root else None) \
        if cfg.output.tensorboard else None
    if board is not None:
        resources.callback(board.close)
    metrics = MetricsLog(run_dir / "metrics.jsonl" if world.is_root else None, board)
    train_split, test_split, meta = hdf5.load(cfg.data, world, replicate_test=cfg.parallel.pipeline_stages > 1 or cfg.parallel.tensor > 1)
    torch.manual_seed(cfg.train.seed)  # identical init everywhere; rank 0's is broadcast anyway
    model = world.agree(build_model, cfg.model, meta, cfg.job_dir).to(device)
    loss = world.agree(build_loss, cfg.train.loss, meta.task, cfg.job_dir)
    # every rank: one forward of its first samples (eval mode: no statistics change) and the
    # loss on it, so a wrong output shape or a detached loss is one line, not a traceback
    world.agree(check_model_and_loss, model, loss, train_split, meta, device, model_id(cfg.model), cfg.train.loss)
    t, stages, dp = cfg.train, None, world  # dp: the ranks the data and the strategy are spread over
    if cfg.parallel.pipeline_stages > 1:  # this rank keeps its stage's blocks; D replicas of the pipeline
        sample = to_device(train_split.take(np.arange(min(t.batch_size, train_split.total))), device)[0]
        stages = split_model(model, cfg.parallel, world, sample, loss)
        resources.callback(stages.pipe.free)
        resources.callback(stages.data.free)
        model, dp = stages.module, stages.data
    elif cfg.parallel.tensor > 1:  # this rank keeps its slices of the gpt; D replicas of the tensor group
        stages = split_tensor(model, cfg.parallel, world)
        resources.callback(stages.free)
        model, dp, loss = stages.module, stages.data, stages.loss
    optimizer = world.agree(build_optimizer, cfg.optim, model.parameters(), dp.size)
    if cfg.data.assign == "dynamic":
        sampler = DynamicSampler(world, train_split.total, t.batch_size, t.seed)
        resources.callback(sampler.close)
    else:
        sampler = DistributedSampler(train_split.total, dp.size, dp.rank, t.batch_size, t.seed,
                                     shuffle_of(cfg.data))
    schedule = build_schedule(cfg.optim, optimizer, -(-sampler.steps_per_epoch // t.accumulate), t.epochs)
    strategy = world.agree(sync.create, cfg.sync, dp, log)
    if stages is not None and cfg.sync.strategy == "zero":
        world.agree(lambda: stages.pipe.tied and _raise("parallel.pipeline_stages with sync.strategy = 'zero': "
                                                        "not yet for a model whose parameters two stages share "
                                                        "(gpt's tied embedding and head); use allreduce"))
    if device.type == "cuda" and sync.REGISTRY[cfg.sync.strategy].remote_update:  # device = "auto" found GPUs
        raise UserError(f"sync.strategy = {cfg.sync.strategy!r} keeps the parameters in host RMA windows: "
                        "set train.device = 'cpu'")
    if cfg.train.precision == "fp16" and device.type != "cuda":  # device = "auto" found no GPU
        raise UserError("train.precision = 'fp16' needs a GPU (train.device resolved to cpu); on CPUs use 'bf16'")
    precision = Precision(cfg.train.precision, device, world, reduced=strategy.sums_gradients)
    straggle = (lambda t0: inject_straggler(world, t, t0)) if t.slowdown_rank >= 0 else None
    step = Step(model, optimizer, strategy, precision, world, clip_norm=cfg.optim.clip_norm,
                on_nonfinite=t.on_nonfinite, max_skipped=t.max_skipped, lockstep=sampler.lockstep, schedule=schedule, loss_fn=loss,
                straggle=straggle, dog=watchdog(), log=log,
                stages=stages if cfg.parallel.pipeline_stages > 1 else None,
                tensor=stages if cfg.parallel.tensor > 1 else None)
    return Job(cfg, world, log, device, threads, run_dir, train_split, test_split, model, loss, Metric(meta.task),
               optimizer, sampler, schedule, strategy, precision, step, metrics, meta)


def train(cfg: Config, world, log) -> tuple[dict, torch.nn.Module | None]:
    """Collective: run the job described by cfg; returns (last metrics row, model), or
    ({}, None) on ranks the strategy keeps for itself (e.g. parameter servers)."""
    with collective_cleanup() as resources:
        dog = watchdog()
        if dog is None:  # called from Python, not the command line: watch this run
            dog = Watchdog(cfg.train.watchdog_s, world)
            resources.callback(dog.close)
        workers, serve = sync.roles(cfg.sync, world, log)
        if serve is not None:
            serve()
            return {}, None
        with dog.phase("loading data"):
            job = workers.agree_job(build, cfg, workers, log, resources)  # servers learn of a failure too
        with dog.phase("resuming"):
            job.step.dog = dog
            pos = resume(job)
            job.strategy.setup(job.model, job.optimizer, resources)
            if pos.restored is not None:
                state.restore_strategy(job.step, pos.restored, job.log)
        # the job's limit from the first step on; until then the start-up one (imports, data
        # loading and resume can take longer than a step: MPITRAIN_WATCHDOG_S, default 600 s)
        dog.set_timeout(cfg.train.watchdog_s)
        tracer = trace.Tracer(workers.rank) if cfg.train.trace else None
        if tracer is not None:
            workers.barrier()  # the ranks' clocks start together
            tracer.start()
        with dog.phase("training"), trace.tracing(tracer):
            row = loop(job, pos, stop_flag(), dog)
        if tracer is not None:
            trace.save(job.world, tracer, job.run_dir / "trace.json", job.log)
        resources.callback(dog.enter, "teardown")  # runs first: the release is watched too
        return row, job.model


def resume(job: Job) -> state.Position:
    """Collective: the position to start from (restored from a checkpoint chosen by
    train.resume: "auto" = the newest valid one in the run folder, "never", or a path, or
    the start); seeds this rank's random stream (dropout) either way."""
    world, how = job.world, job.cfg.train.resume

    def choose():
        if how != "auto":
            return None if how == "never" else how
        found = checkpoint.newest_valid(job.run_dir, job.log)
        return str(found[0]) if found else None
    path = world.on_root(choose)
    tree = state.load(path, world, probe=how != "auto") if path is not None else None  # auto: probed choosing
    pos = state.Position()
    if tree is not None:
        world.agree(state.check_position, tree, job.device, job.cfg.train.epochs, job.train_split.total)
        pos = world.agree(state.restore, job.step, tree, model_id=model_id(job.cfg.model), schedule=job.schedule,
                          log=job.log)
    world.on_root(reset_metrics, job.run_dir / "metrics.jsonl", pos, job.cfg.train, job.log)
    torch.manual_seed(job.cfg.train.seed * 7919 + world.rank)  # per-rank stream
    if tree is not None:
        state.restore_rng(tree, world.rank, job.device)
    return pos


def loop(job: Job, pos: state.Position, stop: StopFlag, dog: Watchdog) -> dict:
    """The epochs: forward, backward, strategy, optimizer; checkpoints, evaluation, metrics."""
    cfg, world, device, model, strategy, sampler = job.cfg, job.world, job.device, job.model, job.strategy, job.sampler
    state.consistency_check(job)
    announce(job)
    tracer = trace.current()
    metrics = job.metrics
    t_start, step, here, row = time.perf_counter(), pos.step, pos, {}
    counted_at = pos.counted  # the last step whose update was applied (checkpoint rotation keeps its checkpoint)
    max_steps = cfg.train.max_steps or float("inf")
    every = cfg.output.checkpoint_every or float("inf")
    for epoch in range(pos.epoch, cfg.train.epochs):
        if step >= max_steps:
            break
        t_epoch, first_step, sent = time.perf_counter(), step, world.bytes_sent()
        if isinstance(job.train_split, hdf5.TokenSplit):  # this epoch's windows (data.window_offset)
            job.train_split.seed = cfg.train.seed
            job.train_split.set_epoch(epoch)
        loss_sum, local, counted, skipped = 0.0, 0, 0, 0
        done = pos.samples_in_epoch if epoch == pos.epoch else 0  # global samples of this epoch
        for group in progress_bar(job, micro_batches(sampler.epoch(epoch, done), cfg.train.accumulate), epoch):
            count = sum(b.global_count for b in group)  # samples in this optimizer step, all ranks
            out = job.step([lambda b=b: to_device(job.train_split.take(b.indices), device) for b in group], count,
                           stop)
            skipped += out.skipped
            counted += 0 if out.skipped else out.samples  # the samples train_loss averages over
            loss_sum, local, done, step = loss_sum + out.loss, local + out.samples, done + count, step + 1
            counted_at = counted_at if out.skipped else step
            here = state.Position(step, epoch, done, last_counted=counted_at)
            if out.signum or (sampler.lockstep and step % every == 0):  # every rank is at this step
                write_checkpoint(job, here, out.signum)
            if step >= max_steps:
                break
        train_time = time.perf_counter() - t_epoch
        if step < max_steps or done >= job.train_split.total:  # a max_steps stop at the epoch's end: the next
            here = state.Position(step, epoch + 1, 0, last_counted=counted_at)  # epoch's start (its row below)
        if not sampler.lockstep:  # ranks ran different step counts: agree on a stop signal now
            if signum := stop.agreed(world):
                write_checkpoint(job, here, signum)
        with dog.waiting(step):
            last = epoch == cfg.train.epochs - 1 or world.any(step >= max_steps)
            tested = {}
            if job.test_split is not None and ((epoch + 1) % cfg.train.eval_every == 0 or last):
                # a consolidated model to evaluate; afterwards every rank trains on what it had
                with state.consolidated(job.step), dog.phase("evaluation"), tracer.span("evaluation"):
                    average_buffers(model, getattr(strategy, "world", world))  # e.g. BatchNorm statistics
                    tested = evaluate(model, job.loss, job.metric, job.test_split, world, device,
                                      stages=job.step.stages or job.step.tensor)
            if tested and not math.isfinite(tested["test_loss"]):  # the same on every rank (a sum)
                what = f"non-finite test loss after epoch {epoch + 1} (step {step})"
                if cfg.train.on_nonfinite == "stop":
                    raise Diverged(f"{what}: stopped", agreed=True)
                if world.is_root:
                    job.log.warning(f"{what} (train.on_nonfinite = 'skip': training goes on)")
            row = epoch_row(job, epoch, step, train_time, [loss_sum, local, counted, world.bytes_sent() - sent,
                                                           step - first_step,
                                                           skipped / (world.size if sampler.lockstep else 1)]) | tested
        row["wall_s"] = time.perf_counter() - t_start
        metrics.append(row)
        log_epoch(job, row)
        if last:
            break
    if here.step % every or not sampler.lockstep:  # the final checkpoint (unless just written)
        with dog.phase("checkpoint"):
            save(job, here)
    with strategy.consolidated():  # training is over: the model returned is the consolidated one
        pass
    if world.is_root:
        job.log.info(f"outputs in {job.run_dir}/ (config.toml, metrics.jsonl, checkpoints)")
    return row


def write_checkpoint(job: Job, here: state.Position, signum: int) -> None:
    """Collective: write a checkpoint; after an agreed stop signal, stop (exit 75)."""
    with watchdog().phase("checkpoint"), trace.current().span("checkpoint"):
        path = save(job, here)
    if signum:
        raise Stopped(signal_name(signum), here.step, path)


def save(job: Job, here: state.Position) -> str:
    """Collective: the job's checkpoint at `here` in the run folder (the newest
    output.keep are kept)."""
    return state.save(checkpoint.path_for(job.run_dir, here.step), job.step, here,
                      {"model": model_id(job.cfg.model), "config": job.cfg.dumps(),
                       "data": json.dumps(dataclasses.asdict(job.meta)), "job_dir": job.cfg.job_dir},
                      job.log, job.cfg.output.keep)


def epoch_row(job: Job, epoch: int, step: int, train_time: float, sums: list) -> dict:
    """Collective: the epoch's metrics row (throughput: all samples over the slowest rank's
    time, since ranks may differ; traffic: bytes handed to MPI per step, mean over ranks)."""
    loss_sum, seen, counted, sent, steps, skipped = job.world.sum(np.array(sums, dtype=np.float64))
    row = {"epoch": epoch + 1, "step": step, "ranks": job.world.size,  # train_loss null: every step skipped
           "train_loss": float(loss_sum / counted) if counted else None, "skipped_steps": int(skipped),
           "samples_per_s": float(seen / job.world.max(train_time)), "lr": job.schedule.get_last_lr()[0],
           "comm_bytes_per_step": float(sent / max(1, steps))}
    if isinstance(job.strategy, sync.Reporting):
        row.update(job.strategy.metrics())
    return row


def progress_bar(job: Job, batches, epoch: int):
    """The epoch's batches, with a tqdm bar on rank 0 (off without a TTY or progress = false)."""
    return bar(batches, total=-(-job.sampler.steps_per_epoch // job.cfg.train.accumulate), unit="step",
               show=job.world.is_root and job.cfg.train.progress, desc=f"epoch {epoch + 1}/{job.cfg.train.epochs}")


def announce(job: Job) -> None:
    """Collective: rank 0 logs what runs where."""
    where = job.world.placement(job.threads)
    st, ts = job.step.stages, job.step.tensor
    if ts is not None:
        where += (f"; grid {ts.tp.size} tensor ranks x {ts.data.size} replicas (rank = replica x {ts.tp.size} + "
                  f"tensor rank: a tensor group's ranks are consecutive), {sum(p.numel() for p in job.model.parameters()):,}"
                  " params on each")
    if st is not None:  # the grid, and each stage's share of the model
        rows = job.world.gather((st.pipe.stage, st.replica, len(st.module), sum(p.numel() for p in st.module.parameters()
                                                                                if st.owned(p))))
        if job.world.is_root:
            c = job.cfg.parallel
            parts = {s: (b, n) for s, r, b, n in rows if r == 0}
            where += (f"; grid {len(parts)} stages x {st.replicas} replicas (rank = replica x {len(parts)} + stage: a "
                      f"pipeline's stages are consecutive ranks), {c.schedule}, {c.micro_batches} micro-batches; "
                      + ", ".join(f"stage {s}: {b} block{'s' if b != 1 else ''}, {n:,} params"
                                  for s, (b, n) in sorted(parts.items())))
    if job.world.is_root:
        c = job.cfg
        whole = st or job.step.tensor
        n_params = whole.total_params if whole is not None else sum(p.numel() for p in job.model.parameters())
        job.log.info(f"{c.output.name}: {job.world.size} ranks x {job.threads} threads, {model_id(c.model)} "
                     f"({n_params:,} params), {c.sync.strategy}, {c.data.mode} data "
                     f"({job.train_split.total} train samples), {job.sampler.steps_per_epoch} steps/epoch")
        job.log.info(f"placement: {where}")


def log_epoch(job: Job, row: dict) -> None:
    if job.world.is_root:
        tested = "".join(f", {k} {v:.4f}" for k, v in row.items() if k.startswith("test_"))
        loss = "-- (every step skipped)" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        job.log.info(f"epoch {row['epoch']}: step {row['step']}, train_loss {loss}" + tested
                     + f", {row['samples_per_s']:.0f} samples/s")
