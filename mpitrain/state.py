"""Collective glue between a running job and its checkpoints: save, find, restore, and the
start-up consistency check."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, checkpoint, sync
from .errors import AgreedError, UserError
from .faults import Diverged
from .models import BUILTIN, model_id
from .sync.base import RankStateful
from .sync.helpers import average_buffers


@dataclass(frozen=True)
class Position:
    """Where training stands: after `step` steps, in `epoch`, `samples_in_epoch` global
    samples into it; `snapshot` is the checkpoint it was restored from, if any."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    snapshot: checkpoint.Snapshot | None = None


def consistency_check(job) -> None:
    """Collective: same config, model structure and package version on every rank."""
    model = [(k, tuple(v.shape), str(v.dtype)) for k, v in job.model.state_dict().items()]
    items = {"config": job.cfg.dumps(), "model structure": json.dumps(model), "mpitrain version": __version__}
    for what, value in items.items():
        h = hashlib.sha256(value.encode()).hexdigest()
        hashes = job.world.allgather(h)
        for r, hr in enumerate(hashes):
            if hr != hashes[0]:
                raise AgreedError(f"{what} differs between rank 0 and rank {r} "
                                  f"(sha256 {hashes[0][:12]} vs {hr[:12]}): start every rank the same way")


def save(job, pos: Position) -> str:
    """Collective: write a checkpoint of the job at pos (rank 0 writes); returns its path.
    A failure (e.g. disk full) leaves the previous checkpoints untouched and is raised as
    one AgreedError on every rank."""
    world, strategy = job.world, job.strategy
    average_buffers(job.model, world)  # e.g. BatchNorm statistics: the same on every rank
    # where the replicas differ (local steps), every rank's own state is saved as it was
    # before consolidation and put back afterwards: a checkpoint never changes training
    replica = None if strategy.sums_gradients else _own_state(job)
    # per-rank strategy state (e.g. compression residuals; the same keys on every rank)
    mine, shared = strategy.rank_state_dict() if isinstance(strategy, RankStateful) else ({}, {})
    own = replica if not mine else (replica or {}) | {f"rank.{k}": v for k, v in mine.items()}
    with strategy.consolidated():  # the model every rank agrees on
        sstate = (strategy.state_dict() if isinstance(strategy, sync.Stateful) else {}) | shared
        rng = world.gather(torch.get_rng_state().numpy())
        cuda_rng = world.gather(torch.cuda.get_rng_state(job.device).numpy()) if job.device.type == "cuda" else None
        every_own = world.gather(own) if own is not None else None
        finite = all(bool(torch.isfinite(p).all()) for p in job.model.parameters())
        if not world.bcast(finite):
            raise Diverged(f"parameters are not finite at step {pos.step}: checkpoint not written", agreed=True)
        err, path = None, checkpoint.path_for(job.run_dir, pos.step)
        if world.is_root:
            snap = checkpoint.Snapshot(
                step=pos.step, epoch=pos.epoch, samples_in_epoch=pos.samples_in_epoch, world_size=world.size,
                strategy=job.cfg.sync.strategy, model_name=model_id(job.cfg.model), config=job.cfg.dumps(),
                model={k: v.detach().cpu().numpy() for k, v in job.model.state_dict().items()},
                **optimizer_arrays(job.optimizer), strategy_state=sstate, rng=np.stack(rng),
                cuda_rng=np.stack(cuda_rng) if cuda_rng is not None else None, amp=job.precision.state_dict(),
                rank_state=every_own or [])
            try:
                secs = checkpoint.write(path, snap)
                checkpoint.prune(job.run_dir, job.cfg.output.keep)
                job.log.info(f"checkpoint {path.name} at step {pos.step} ({path.stat().st_size / 1e6:.1f} MB, "
                             f"{secs:.2f} s)")
            except OSError as e:
                prev = checkpoint.list_checkpoints(job.run_dir)
                err = (f"checkpoint at step {pos.step} failed: {e.strerror or e}; "
                       + (f"previous checkpoint {prev[0].name} intact" if prev else "no earlier checkpoint"))
        world.raise_any(world.bcast(err))
    if replica is not None:
        _load_own_state(job, replica)
    return str(path)


def _own_state(job) -> dict[str, np.ndarray]:
    """This rank's parameters, local optimizer state and strategy state, as arrays."""
    out = {f"param.{k}": v.detach().cpu().numpy().copy() for k, v in job.model.state_dict().items()}
    for i, entries in optimizer_arrays(job.optimizer)["optimizer_state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in entries.items()})
    if isinstance(job.strategy, sync.Stateful):
        out.update({f"strategy.{k}": v for k, v in job.strategy.state_dict().items()})
    return out


def _load_own_state(job, own: dict[str, np.ndarray]) -> None:
    """Put back what _own_state saved (after setup: the strategy's state too)."""
    params = {k[6:]: v for k, v in own.items() if k.startswith("param.")}
    with torch.no_grad():
        for k, t in job.model.state_dict().items():
            t.copy_(torch.from_numpy(np.asarray(params[k])).view_as(t))
    if isinstance(job.strategy, sync.Stateful):
        job.strategy.load_state_dict({k[9:]: v for k, v in own.items() if k.startswith("strategy.")})


def _replicas(snap: checkpoint.Snapshot) -> list[dict[str, np.ndarray]]:
    """Every rank's own parameters, optimizer and strategy state where the checkpoint holds
    them (strategies whose replicas differ), else []."""
    ranks = snap.rank_state
    return ranks if ranks and any(k.startswith("param.") for k in ranks[0]) else []


def _rank_arrays(job, snap: checkpoint.Snapshot) -> dict[str, np.ndarray] | None:
    """This rank's per-rank strategy state in the checkpoint ({} if it holds none); None if
    it was written at another world size: such state cannot be mapped to the new ranks and
    is dropped, with one warning."""
    every = [{k[5:]: v for k, v in r.items() if k.startswith("rank.")} for r in snap.rank_state]
    if not any(every):
        return {}
    if len(every) == job.world.size:
        return every[job.world.rank]
    if job.world.is_root:
        job.log.warning(f"checkpoint written at {len(every)} ranks, resuming at {job.world.size}: its per-rank "
                        f"strategy state ({', '.join(sorted(every[0]))}) cannot be mapped and is dropped")
    return None


def _own_optimizer_state(own: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    state: dict[str, dict[str, np.ndarray]] = {}
    for k, v in own.items():
        if k.startswith("optim."):
            i, key = k[6:].split(".", 1)
            state.setdefault(i, {})[key] = v
    return state


def restore_strategy(job, snap: checkpoint.Snapshot) -> None:
    """Collective, after the strategy's setup (which makes the replicas equal): this rank's
    own parameters and strategy state where the checkpoint has them for this world size
    (exact resume), else the consolidated strategy state; then per-rank strategy state
    (RankStateful), which only a checkpoint of this world size can supply."""
    replicas = _replicas(snap)
    if len(replicas) == job.world.size:
        _load_own_state(job, replicas[job.world.rank])
    elif isinstance(job.strategy, sync.Stateful):
        job.strategy.load_state_dict(snap.strategy_state)
    if isinstance(job.strategy, RankStateful):
        job.strategy.load_rank_state_dict(_rank_arrays(job, snap), snap.strategy_state)


def _check_position(job, snap: checkpoint.Snapshot) -> None:
    """Step, epoch, sample position and RNG states must make sense for this job."""
    t = job.cfg.train
    problems = []
    if snap.step < 0:
        problems.append(f"step {snap.step} < 0")
    if not 0 <= snap.epoch <= t.epochs:
        problems.append(f"epoch {snap.epoch} outside 0..{t.epochs} (train.epochs)")
    if not 0 <= snap.samples_in_epoch <= job.train_split.total:
        problems.append(f"samples_in_epoch {snap.samples_in_epoch} outside 0..{job.train_split.total}")
    rng = np.asarray(snap.rng)
    if rng.ndim != 2 or rng.dtype != np.uint8 or rng.shape[1] != torch.get_rng_state().numel():
        problems.append(f"RNG states of shape {rng.shape} ({rng.dtype}), expected (ranks, "
                        f"{torch.get_rng_state().numel()}) uint8")
    cuda = snap.cuda_rng
    if cuda is not None and (np.ndim(cuda) != 2 or np.asarray(cuda).dtype != np.uint8):
        problems.append(f"CUDA RNG states of shape {np.shape(cuda)}, expected (ranks, n) uint8")
    elif job.device.type == "cuda" and cuda is not None \
            and np.shape(cuda)[1] != torch.cuda.get_rng_state(job.device).numel():
        problems.append(f"CUDA RNG states of {np.shape(cuda)[1]} bytes, this GPU's have "
                        f"{torch.cuda.get_rng_state(job.device).numel()}")
    if problems:
        raise UserError(f"checkpoint at step {snap.step} does not fit this job: {'; '.join(problems)}")


def load_optimizer(opt: torch.optim.Optimizer, optimizer_state, param_groups) -> dict:
    """Load checkpoint arrays into `opt` after checking every shape against its parameters;
    the hyperparameters stay `opt`'s own (the lr is the checkpoint's, i.e. where the schedule
    was). Returns {name: (checkpoint's, kept)} for those that differed."""
    mine = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, entries in optimizer_state.items():
        if not str(i).isdigit() or int(i) >= len(params):
            raise UserError(f"checkpoint optimizer state names parameter {i!r}; this job has {len(params)}")
        p, state[int(i)] = params[int(i)], {}
        for k, v in entries.items():
            a = np.asarray(v)
            if a.dtype.kind not in "fiub" or (a.ndim and a.shape != tuple(p.shape)):
                raise UserError(f"checkpoint optimizer state {i}/{k} has shape {a.shape} ({a.dtype}); "
                                f"its parameter has {tuple(p.shape)}")
            state[int(i)][k] = torch.from_numpy(np.array(a)) if a.ndim or k != "step" else torch.tensor(float(a))
    try:
        opt.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint optimizer state does not fit this {type(opt).__name__}: {e}") from None
    changed = {}
    for g, want in zip(opt.param_groups, mine):
        changed.update({k: (g.get(k), v) for k, v in want.items() if g.get(k) != v})
        g.update(want)
    return changed


def optimizer_arrays(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    state = {str(i): {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v))
                      for k, v in entries.items()} for i, entries in sd["state"].items()}
    return {"optimizer_state": state, "param_groups": sd["param_groups"]}


def find(job) -> checkpoint.Snapshot | None:
    """Collective: the snapshot to resume from, per train.resume ("auto", "never" or a path)."""
    how, log = job.cfg.train.resume, job.log

    def choose():
        if how == "never":
            return None
        if how != "auto":
            return how
        found = checkpoint.newest_valid(job.run_dir, log if job.world.is_root else None)
        return str(found[0]) if found else None
    path = job.world.on_root(choose)
    if path is None:
        return None
    return job.world.agree(checkpoint.read, Path(path))


def restore(job, snap: checkpoint.Snapshot) -> Position:
    """Load a snapshot into the (not yet set up) model and optimizer on this rank, after
    checking it fits the job. The checkpoint supplies state; hyperparameters (momentum,
    weight decay, betas, base lr, ...) come from the job file, a changed one is logged.
    Where the checkpoint holds every rank's own state and the world size is the same, each
    rank continues from its own (exact resume); otherwise every rank starts from the
    consolidated model and rank 0's optimizer state (a new world size, or replicas that
    never differ)."""
    _check_position(job, snap)
    mine = model_id(job.cfg.model)
    if mine not in (snap.model_name, BUILTIN.get(snap.model_name, ("",))[0]):
        raise UserError(f"checkpoint from another model: it was trained with {snap.model_name!r}, this job "
                        f"builds {mine!r} (model.factory / model.name)")
    replicas = _replicas(snap)
    own = replicas[job.world.rank] if len(replicas) == job.world.size else None
    model = {k[6:]: v for k, v in own.items() if k.startswith("param.")} if own else snap.model
    model_sd = job.model.state_dict()
    if set(model) != set(model_sd) or any(tuple(np.shape(model[k])) != tuple(v.shape)
                                          or np.asarray(model[k]).dtype.kind not in "fiub"
                                          for k, v in model_sd.items()):
        raise UserError(f"checkpoint from another model: it holds {snap.model_name} with "
                        f"{sum(np.size(a) for a in model.values()):,} values, this job builds "
                        f"{mine} with {sum(v.numel() for v in model_sd.values()):,}")
    job.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.items()})
    opt_state = _own_optimizer_state(own) if own else snap.optimizer_state
    if opt_state or snap.param_groups:
        changed = load_optimizer(job.optimizer, opt_state, snap.param_groups)
        if changed and job.world.is_root:
            job.log.info("optimizer settings from the job file, not the checkpoint: "
                         + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    # the LR schedule is a closed form of the step (LambdaLR): jump to it in O(1)
    job.schedule.last_epoch = snap.step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job.schedule.step()
    if not job.precision.load_state_dict(snap.amp) and job.precision.scaler is not None and job.world.is_root:
        job.log.info("the checkpoint holds no fp16 loss scale (another precision, or an older checkpoint): "
                     "the loss scale starts afresh")
    if replicas and own is None and job.world.is_root:
        job.log.info(f"checkpoint written at {len(replicas)} ranks, resuming at {job.world.size}: every "
                     "rank starts from the consolidated model and rank 0's optimizer state")
    return Position(snap.step, snap.epoch, snap.samples_in_epoch, snap)


def restore_rng(snap: checkpoint.Snapshot, rank: int, device) -> None:
    """This rank's random streams as saved (CPU, and CUDA for GPU jobs), where the
    checkpoint has this rank (a job resumed on more ranks keeps its fresh seeds there)."""
    if rank < len(snap.rng):
        torch.set_rng_state(torch.from_numpy(np.array(snap.rng[rank])))
    cuda = snap.cuda_rng
    if device.type == "cuda" and cuda is not None and rank < len(cuda):
        torch.cuda.set_rng_state(torch.from_numpy(np.array(cuda[rank], dtype=np.uint8)), device)
