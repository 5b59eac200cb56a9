"""The training loop: strategy-agnostic, readable top to bottom."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from tqdm import tqdm

from . import state, sync
from .data import hdf5
from .data.sampler import DistributedSampler, DynamicSampler, shard_bounds
from .errors import UserError
from .faults import StopFlag, Stopped, Watchdog, stop_flag
from .metrics import MetricsLog
from .models import build_model, build_optimizer, build_schedule


def configure_threads(cfg, world) -> int:
    n = cfg.train.threads or world.cores_per_rank()
    torch.set_num_threads(n)
    return n


def sampler_scope(cfg) -> str:
    if cfg.data.assign == "dynamic" and (cfg.data.mode != "replicated" or cfg.sync.strategy != "async"):
        raise UserError("data.assign = 'dynamic' needs data.mode = 'replicated' and sync.strategy = 'async' "
                        "(ranks then run different numbers of steps)")
    scope = cfg.data.shuffle
    if scope == "auto":
        return "global" if cfg.data.mode == "replicated" else "shard"
    if scope == "global" and cfg.data.mode == "partitioned":
        raise UserError("data.shuffle = 'global' needs data.mode = 'replicated' "
                        "(partitioned ranks hold only their shard; use 'shard')")
    return scope


def prepare_run_dir(cfg, world) -> Path:
    """Collective: rank 0 creates the run folder and writes the resolved config."""
    run_dir = cfg.run_dir

    def make():
        if world.is_root:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "config.toml").write_text(cfg.dumps())
                (run_dir / "metrics.jsonl").touch()
            except OSError as e:
                raise UserError(f"output.dir: cannot write to {run_dir}: {e.strerror}") from None
    world.agree(make)
    return run_dir


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows up to `step` (a resumed run rewrites the later ones)."""
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


@torch.no_grad()
def evaluate(model, split, world, device, batch_size: int = 1024) -> tuple[float, float]:
    """Collective: (mean loss, accuracy) over the whole split; each rank evaluates its shard."""
    model.eval()
    lo, hi = shard_bounds(split.total, world.size, world.rank)
    totals = np.zeros(3)  # loss sum, correct, count
    for a in range(lo, hi, batch_size):
        x, y = split.take(np.arange(a, min(a + batch_size, hi)))
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        out = model(x)
        totals += [F.cross_entropy(out, y, reduction="sum").item(), (out.argmax(1) == y).sum().item(), len(y)]
    world.comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    model.train()
    return totals[0] / totals[2], totals[1] / totals[2]


@dataclass
class Job:
    """Everything a run needs, built (and validated) before the first step."""

    cfg: object
    world: object
    log: object
    device: torch.device
    threads: int
    run_dir: Path
    train_split: object
    test_split: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler
    schedule: object
    strategy: sync.Strategy


def build(cfg, world, log) -> Job:
    """Collective: validate and build the job; any UserError is agreed on by all ranks."""
    threads = configure_threads(cfg, world)
    device = world.agree(world.device, cfg.train.device)
    scope = world.agree(sampler_scope, cfg)
    run_dir = prepare_run_dir(cfg, world)
    train_split, test_split, meta = hdf5.load(cfg.data, world)
    torch.manual_seed(cfg.train.seed)  # identical init everywhere; rank 0's is broadcast anyway
    model = world.agree(build_model, cfg.model, meta.input_shape, meta.num_classes).to(device)
    optimizer = world.agree(build_optimizer, cfg.optim, model.parameters(), world.size)
    sampler = (DynamicSampler(world, train_split.total, cfg.train.batch_size, cfg.train.seed, cfg.train.epochs)
               if cfg.data.assign == "dynamic" else
               DistributedSampler(train_split.total, world.size, world.rank, cfg.train.batch_size,
                                  cfg.train.seed, scope))
    schedule = build_schedule(cfg.optim, optimizer, sampler.steps_per_epoch, cfg.train.epochs)
    strategy = world.agree(sync.create, cfg, world, log)
    return Job(cfg, world, log, device, threads, run_dir, train_split, test_split, model, optimizer,
               sampler, schedule, strategy)


def train(cfg, world, log) -> tuple[dict, torch.nn.Module | None]:
    """Collective: run the job described by cfg; returns (last metrics row, model)."""
    world, serve = sync.roles(cfg, world, log)
    if serve is not None:  # a dedicated parameter-server rank: host the store until the end
        serve()
        return {}, None
    job = world.agree_job(build, cfg, world, log)  # servers, if any, learn of a failure too
    stop = stop_flag()
    try:
        snap = state.find(job)
        pos = world.agree(state.restore, job, snap) if snap else state.Position()
        if world.is_root:
            if snap:
                trim_metrics(job.run_dir / "metrics.jsonl", pos.step)
                log.info(f"resuming from step {pos.step} (epoch {pos.epoch + 1}, checkpoint written at "
                         f"{snap.world_size} ranks)")
            else:
                (job.run_dir / "metrics.jsonl").write_text("")
        job.strategy.setup(job.model, job.optimizer)
        if snap:
            job.strategy.load_state_dict(snap.strategy_state)
        torch.manual_seed(cfg.train.seed * 7919 + world.rank)  # per-rank stream (dropout)
        if snap and world.rank < len(snap.rng):
            torch.set_rng_state(torch.from_numpy(snap.rng[world.rank].copy()))
        dog = Watchdog(world, cfg.train.watchdog_s, log)
        try:
            return loop(job, pos, stop, dog), job.model
        finally:
            dog.close()
    finally:
        job.strategy.close()
        if hasattr(job.sampler, "close"):
            job.sampler.close()


def _maybe_checkpoint(job: Job, here: state.Position, stop: StopFlag, due: bool) -> None:
    """Collective: checkpoint when due or when any rank got a stop signal (then stop)."""
    signum = stop.agreed(job.world.comm)
    if signum or due:
        path = state.save(job, here)
        if signum:
            raise Stopped(signal.Signals(signum).name, here.step, path)


def loop(job: Job, pos: state.Position, stop: StopFlag, dog: Watchdog) -> dict:
    """The epochs: forward, backward, strategy, optimizer; checkpoints, evaluation, metrics."""
    cfg, world, log, device, model = job.cfg, job.world, job.log, job.device, job.model
    strategy, optimizer, schedule, sampler = job.strategy, job.optimizer, job.schedule, job.sampler
    state.consistency_check(job)
    t_start = time.perf_counter()
    metrics = MetricsLog(job.run_dir / "metrics.jsonl" if world.is_root else None)
    if world.is_root:
        n_params = sum(p.numel() for p in model.parameters())
        log.info(f"{cfg.output.name}: {world.size} ranks x {job.threads} threads, {cfg.model.name} "
                 f"({n_params:,} params), {cfg.sync.strategy}, {cfg.data.mode} data "
                 f"({job.train_split.total} train samples), {sampler.steps_per_epoch} steps/epoch")
    step, row, here = pos.step, {}, pos
    max_steps = cfg.train.max_steps or float("inf")
    every = cfg.output.checkpoint_every or float("inf")
    for epoch in range(pos.epoch, cfg.train.epochs):
        if step >= max_steps:
            break
        t_epoch, loss_sum, local = time.perf_counter(), 0.0, 0
        done = pos.samples_in_epoch if epoch == pos.epoch else 0  # global samples of this epoch
        show = world.is_root and cfg.train.progress
        bar = tqdm(sampler.epoch(epoch, start_sample=done or None), total=sampler.steps_per_epoch,
                   leave=False, dynamic_ncols=True, disable=None if show else True,  # None: off if no TTY
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
        for batch in bar:
            dog.beat(step + 1)
            x, y = job.train_split.take(batch.indices)
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            t_compute = time.perf_counter()
            strategy.zero_grad()
            loss = F.cross_entropy(model(x), y, reduction="sum")
            (loss * strategy.loss_weight(batch.global_count)).backward()
            if world.rank == cfg.train.slowdown_rank:  # injected straggler
                time.sleep((cfg.train.slowdown_factor - 1) * (time.perf_counter() - t_compute))
            dog.beat(step + 1, waiting=True)
            strategy.after_backward(step)
            optimizer.step()
            schedule.step()
            strategy.after_step(step)
            loss_sum += loss.item()
            local += len(batch.indices)
            done += batch.global_count
            step += 1
            here = state.Position(step, epoch, done)
            if sampler.lockstep:  # every rank is at this step: agree on stop / checkpoint now
                _maybe_checkpoint(job, here, stop, step % every == 0)
            if step >= max_steps:
                break
        train_time = time.perf_counter() - t_epoch
        here = state.Position(step, epoch + 1, 0) if step < max_steps else here
        if not sampler.lockstep:  # ranks ran different step counts: agree at the epoch end
            _maybe_checkpoint(job, here, stop, False)
        # the job's throughput: all samples over the slowest rank's time (ranks may differ)
        loss_sum, seen = world.comm.allreduce(np.array([loss_sum, local]), op=MPI.SUM)
        rate = seen / world.comm.allreduce(train_time, op=MPI.MAX)
        last = epoch == cfg.train.epochs - 1 or world.comm.allreduce(step >= max_steps, op=MPI.LOR)
        row = {"epoch": epoch + 1, "step": step, "ranks": world.size, "train_loss": float(loss_sum / max(1, seen)),
               "samples_per_s": float(rate), "lr": schedule.get_last_lr()[0]}
        row.update(strategy.metrics())
        dog.beat(step, waiting=True)
        strategy.before_eval()
        if job.test_split is not None and ((epoch + 1) % cfg.train.eval_every == 0 or last):
            row["test_loss"], row["test_acc"] = evaluate(model, job.test_split, world, device)
        strategy.after_eval()
        dog.beat(step, waiting=True)
        row["wall_s"] = time.perf_counter() - t_start
        metrics.append(row)
        if world.is_root:
            log.info("epoch {epoch}: step {step}, train_loss {train_loss:.4f}".format(**row)
                     + (", test_loss {test_loss:.4f}, test_acc {test_acc:.4f}".format(**row)
                        if "test_acc" in row else "")
                     + f", {row['samples_per_s']:.0f} samples/s")
        if last:
            break
    if here.step % every or not sampler.lockstep:  # the final checkpoint (unless just written)
        state.save(job, here)
    if world.is_root:
        log.info(f"outputs in {job.run_dir}/ (config.toml, metrics.jsonl, checkpoints)")
    return row
