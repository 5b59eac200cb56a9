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
    with strategy.consolidated():  # the model every rank agrees on
        sstate = strategy.state_dict() if isinstance(strategy, sync.Stateful) else {}
        rng = world.gather(torch.get_rng_state().numpy())
        err, path = None, checkpoint.path_for(job.run_dir, pos.step)
        if world.is_root:
            snap = checkpoint.Snapshot(
                step=pos.step, epoch=pos.epoch, samples_in_epoch=pos.samples_in_epoch, world_size=world.size,
                strategy=job.cfg.sync.strategy, model_name=job.cfg.model.name, config=job.cfg.dumps(),
                model={k: v.detach().cpu().numpy() for k, v in job.model.state_dict().items()},
                **_optimizer_arrays(job.optimizer), strategy_state=sstate, rng=np.stack(rng))
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
    return str(path)


def _optimizer_arrays(opt: torch.optim.Optimizer) -> dict:
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
    """Load a snapshot into the (not yet set up) model and optimizer on this rank."""
    model_sd = job.model.state_dict()
    if set(snap.model) != set(model_sd) or any(tuple(snap.model[k].shape) != tuple(v.shape)
                                               for k, v in model_sd.items()):
        raise UserError(f"checkpoint from another model: it holds {snap.model_name} with "
                        f"{sum(a.size for a in snap.model.values()):,} values, this job builds "
                        f"{job.cfg.model.name} with {sum(v.numel() for v in model_sd.values()):,}")
    job.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in snap.model.items()})
    if snap.optimizer_state or snap.param_groups:
        try:
            job.optimizer.load_state_dict({
                "state": {int(i): {k: torch.from_numpy(np.array(v)) if np.ndim(v) or k != "step"
                                   else torch.tensor(float(v)) for k, v in e.items()}
                          for i, e in snap.optimizer_state.items()},
                "param_groups": snap.param_groups})
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint optimizer state does not fit optim.name = "
                            f"{job.cfg.optim.name!r}: {e}") from None
    with warnings.catch_warnings():  # replay the LR schedule to the checkpoint's step
        warnings.simplefilter("ignore")
        for _ in range(snap.step):
            job.schedule.step()
    r = job.world.rank
    if r < len(snap.rng):
        torch.set_rng_state(torch.from_numpy(np.array(snap.rng[r])))
    return Position(snap.step, snap.epoch, snap.samples_in_epoch, snap)
