"""Collective glue between training and its checkpoints, for the job runner and the Python
API alike: the one writer (`save`), `load`, `restore` (before the strategy's setup) and
`restore_strategy` (after it), and the start-up consistency check.

A checkpoint is a tree of component state_dicts (checkpoint.py has the file format):
position, model, optim, strategy, precision, and per rank its random generators, its own
replica (strategies whose replicas differ) and its own strategy state (RankStateful).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from ._version import __version__
from .errors import AgreedError, UserError
from .faults import Diverged
from .models import BUILTIN
from .sync.base import RankStateful, Sharded, Stateful
from .sync.helpers import average_buffers


@dataclass(frozen=True)
class Position:
    """Where training stands: after `step` steps, in `epoch`, `samples_in_epoch` global
    samples into it; `restored` is the checkpoint tree it was restored from, if any;
    `last_counted` the last step whose update was applied (None: `step`; earlier where
    the steps since were all skipped, train.on_nonfinite = "skip")."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    restored: dict | None = None
    last_counted: int | None = None

    @property
    def counted(self) -> int:
        return self.step if self.last_counted is None else self.last_counted


def consistency_check(job) -> None:
    """Collective: same config, model structure and package version on every rank."""
    model = [(k, tuple(v.shape), str(v.dtype)) for k, v in job.model.state_dict().items()]
    items = {"config": job.cfg.dumps(), "model structure": json.dumps(model), "mpitrain version": __version__}
    for what, value in items.items():
        h = hashlib.sha256(value.encode()).hexdigest()
        # (a pipeline: each stage's structure is its own; its replicas must agree on it)
        hashes = (getattr(job.strategy, "world", job.world) if what == "model structure" else job.world).allgather(h)
        for r, hr in enumerate(hashes):
            if hr != hashes[0]:
                raise AgreedError(f"{what} differs between rank 0 and rank {r} "
                                  f"(sha256 {hashes[0][:12]} vs {hr[:12]}): start every rank the same way")


# -- components: state_dicts as trees of arrays ---------------------------------------------

def model_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def optim_state(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    state = {str(i): {k: (v.detach().cpu().numpy().copy() if torch.is_tensor(v) else np.asarray(v))
                      for k, v in entries.items()} for i, entries in sd["state"].items()}
    return {"state": state, "param_groups": json.dumps(sd["param_groups"])}


def _strategy_state(strategy) -> dict:
    return strategy.state_dict() if isinstance(strategy, Stateful) else {}


def _replica(step) -> dict:
    """This rank's own parameters, optimizer state and strategy state."""
    return {"model": model_state(step.model), "optim": optim_state(step.optimizer),
            "strategy": _strategy_state(step.strategy)}


def _rng(device: torch.device) -> dict:
    out = {"torch_cpu": torch.get_rng_state().numpy().copy()}
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device).numpy().copy()
    return out


def _dtype(a) -> np.dtype:
    return a.dtype if isinstance(a, (np.ndarray, checkpoint.Slab)) else np.asarray(a).dtype


def load_model(model: torch.nn.Module, arrays: dict, what: str) -> None:
    """Load arrays into the model after checking names, shapes and kinds."""
    mine = model.state_dict()
    if set(arrays) != set(mine) or any(tuple(np.shape(arrays[k])) != tuple(v.shape)
                                       or _dtype(arrays[k]).kind not in "fiub" for k, v in mine.items()):
        raise UserError(f"checkpoint from another model: it holds {what} with "
                        f"{sum(np.size(a) for a in arrays.values()):,} values in {len(arrays)} tensors, this job "
                        f"builds one with {sum(v.numel() for v in mine.values()):,} in {len(mine)}")
    with torch.no_grad():
        for k, t in mine.items():
            t.copy_(torch.from_numpy(np.array(arrays[k])).view_as(t))


def optim_entries(groups: list[list], tree: dict) -> dict[int, dict]:
    """A checkpoint's optimizer state {parameter index: {key: array or checkpoint.Slab}},
    every shape checked against `groups` (the optimizer's whole parameters, per group)
    without reading the arrays."""
    given = tree.get("param_groups", [])
    given = json.loads(given) if isinstance(given, str) else given
    sizes = [len(g) for g in groups]
    if given and [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in given] != sizes:
        raise UserError(f"checkpoint optimizer's parameter groups hold "
                        f"{[len(g.get('params', [])) if isinstance(g, dict) else '?' for g in given]} parameters; "
                        f"this job's hold {sizes}")
    params, state = [p for g in groups for p in g], {}
    for i, entries in tree.get("state", {}).items():
        if not str(i).isdigit() or int(i) >= len(params) or not isinstance(entries, dict):
            raise UserError(f"checkpoint optimizer state names parameter {i!r}; this job has {len(params)}")
        p, state[int(i)] = params[int(i)], {}
        for k, v in entries.items():
            a = v if isinstance(v, checkpoint.Slab) else np.asarray(v)
            if a.dtype.kind not in "fiub" or (len(a.shape) and tuple(a.shape) != tuple(p.shape)):
                raise UserError(f"checkpoint optimizer state {i}/{k} has shape {tuple(a.shape)} ({a.dtype}); "
                                f"its parameter has {tuple(p.shape)}")
            state[int(i)][k] = a
    return state


def optim_groups(opt: torch.optim.Optimizer, tree: dict) -> dict:
    """Take the checkpoint's learning rate (where the schedule was) and the settings `opt`
    lacks; `opt`'s own hyperparameters stay. Returns {name: (checkpoint's, kept)} for those
    that differed."""
    given = tree.get("param_groups", [])
    given = json.loads(given) if isinstance(given, str) else given
    changed = {}
    for g, theirs in zip(opt.param_groups, given):
        for k, v in theirs.items():
            if k == "params":
                continue
            if k == "lr" or k not in g:
                g[k] = v
            elif g[k] != v:
                changed[k] = (v, g[k])
    return changed


def load_optimizer(opt: torch.optim.Optimizer, tree: dict) -> dict:
    """Load a checkpoint's optim tree into `opt` after checking every shape against its
    parameters; the hyperparameters stay `opt`'s own (the lr is the checkpoint's, i.e. where
    the schedule was). Returns {name: (checkpoint's, kept)} for those that differed."""
    state = {i: {k: torch.from_numpy(np.array(a)) if len(a.shape) or k != "step" else torch.tensor(float(np.asarray(a)))
                 for k, a in entries.items()}
             for i, entries in optim_entries([g["params"] for g in opt.param_groups], tree).items()}
    groups = [{**g, "params": [p for p in g["params"]]} for g in opt.state_dict()["param_groups"]]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint optimizer state does not fit this {type(opt).__name__}: {e}") from None
    return optim_groups(opt, tree)


@contextlib.contextmanager
def consolidated(step):
    """Collective: within the block, the local model is the one every rank agrees on (to
    evaluate or save); afterwards every rank trains on exactly what it had before. Where
    replicas differ (local steps), each rank's own parameters and strategy state (e.g. the
    steps into its block) are kept and put back, so evaluating or checkpointing never
    inserts a synchronisation the uninterrupted run would not have."""
    replica = _replica(step) if step.strategy.replicas_differ else None
    with step.strategy.consolidated():
        yield replica
    if replica is not None:
        _load_replica(step, replica)


# -- the one writer ---------------------------------------------------------------------------

def save(path: Path, step, pos: Position, meta: dict, log=None, keep: int = 0) -> str:
    """Collective: write a checkpoint of `step`'s components (a step.Step) at `pos` to
    `path` (rank 0 writes; then, with keep > 0, all but the newest `keep` checkpoints in
    its folder are removed, except this one and the last written after a counted step:
    `rotate`); returns the path. `meta` adds to the file's /meta (e.g. the config and the
    model's id); /meta's last_counted_step is `pos.counted`. A failure (e.g. disk full)
    leaves the previous checkpoints untouched and is raised as one AgreedError on every
    rank. Writing never changes training: where replicas differ, every rank's own state is
    saved before consolidation and put back afterwards."""
    world, strategy, model = step.world, step.strategy, step.model
    average_buffers(model, getattr(strategy, "world", world))  # e.g. BatchNorm statistics: alike on every replica
    own = {"rng": _rng(step.precision.device)}
    if isinstance(strategy, RankStateful) and (mine := strategy.rank_state_dict()):
        own["strategy"] = mine
    with consolidated(step) as replica:  # the model every rank agrees on
        if replica is not None:
            own["replica"] = replica
        shared = _strategy_state(strategy)
        # pieces every rank writes its own of (no rank holds them all), in the unsharded layout:
        # a pipeline stage's tensors by their names in the whole model; zero's optimizer chunks
        if (layout := step.stages or step.tensor) is not None:  # model parallel: its own part, by whole names
            mine = layout.parts(step)
            skeletons = world.gather(_skeleton(mine))
        elif isinstance(strategy, Sharded):
            mine, skeletons = {"optim": strategy.optim_state(step.optimizer)}, None
        else:
            mine, skeletons = None, None
        every = world.gather(own)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if not world.bcast(finite):
            raise Diverged(f"parameters are not finite at step {pos.step}: checkpoint not written", agreed=True)
        tree = head = None
        if world.is_root:
            tree = {"position": {"step": pos.step, "epoch": pos.epoch, "samples_in_epoch": pos.samples_in_epoch},
                    "model": model_state(model), "optim": optim_state(step.optimizer) if mine is None else mine["optim"],
                    "strategy": shared, "precision": step.precision.state_dict(), "ranks": {str(r): t for r, t in enumerate(every)}}
            head = {"world_size": world.size, "strategy": strategy.name, "model": "", "config": "",
                    "replicas_differ": bool(strategy.replicas_differ), "last_counted_step": pos.counted} | meta
            if skeletons is not None:  # the whole model's tensors and optimizer state, from every stage
                whole = _merge(skeletons)
                tree["model"] = whole.get("model", {})
                tree["optim"] = {"state": whole.get("optim", {}).get("state", {}),
                                 "param_groups": json.dumps([{**{k: v for k, v in g.items() if k != "params"},
                                                              "params": list(range((step.stages or step.tensor).total))}
                                                             for g in step.optimizer.param_groups])}
        err, t0 = None, time.perf_counter()
        try:
            if mine is None:
                if world.is_root:
                    checkpoint.write(path, tree, head)
            else:
                _write_together(world, path, tree, head, mine)
            if world.is_root:
                if keep:
                    rotate(path, pos, keep, log)
                if log is not None:
                    log.info(f"checkpoint {path.name} at step {pos.step} ({path.stat().st_size / 1e6:.1f} MB, "
                             f"{time.perf_counter() - t0:.2f} s)")
        except OSError as e:
            prev = [p for p in checkpoint.list_checkpoints(path.parent) if p != path]
            err = (f"checkpoint at step {pos.step} failed: {e.strerror or e}; "
                   + (f"previous checkpoint {prev[0].name} intact" if prev else "no earlier checkpoint"))
        world.raise_any(err)
    return str(path)


def _write_together(world, path: Path, tree: dict | None, head: dict | None, mine: dict) -> None:
    """Collective: a checkpoint whose sharded optimizer state every rank writes its own
    pieces of (no rank holds all of it): rank 0 writes the rest and places the sharded
    datasets, every rank writes its pieces, hashes a share of the blocks, rank 0 seals.
    An OSError on any rank is raised on every rank (the temporary file removed)."""
    def step(fn, *args):  # one stage; everyone learns of any rank's OSError before the next
        try:
            out, err = fn(*args), None
        except (OSError, ValueError) as e:
            out, err = None, f"{e.strerror or e}" if isinstance(e, OSError) else str(e)
        errs = [e for e in world.allgather(err) if e is not None]
        if errs:
            if world.is_root:
                path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            raise OSError(errs[0])
        return out
    crcs = world.gather(checkpoint.piece_crcs(mine))
    placed = step(lambda: checkpoint.write_shell(path, tree, head, checkpoint.whole_crcs(tree, crcs))
                  if world.is_root else None)
    placed = world.bcast(placed)
    step(checkpoint.write_pieces, path, mine, placed)
    digests = world.gather(step(checkpoint.block_digests, path, world.rank, world.size))
    step(lambda: checkpoint.seal(path, {i: d for part in digests for i, d in part.items()}) if world.is_root else None)


def pieces_of(shape: tuple, dim, start, a: np.ndarray) -> list:
    """(flat offset, values) pieces of a slice `a` = full.narrow(dim, start, len) of a
    tensor of `shape` (dim None: the whole tensor; dim 0: one contiguous piece; dim 1 of a
    matrix: one piece per row)."""
    if dim is None:
        return [(0, a.reshape(-1))]
    if dim == 0:
        return [(start * int(np.prod(shape[1:], dtype=np.int64)), a.reshape(-1))]
    return [(i * shape[1] + start, a[i].reshape(-1)) for i in range(shape[0])]


def narrow(a, shape: tuple, dim, start, stop) -> np.ndarray:
    """full.narrow(dim, start, stop - start) of a checkpoint array (a Slab: dim 0 reads
    only those rows)."""
    if dim is None:
        return np.asarray(a)
    if dim == 0 and isinstance(a, checkpoint.Slab):
        row = int(np.prod(shape[1:], dtype=np.int64))
        return a.read(start * row, stop * row).reshape(stop - start, *shape[1:])
    return np.take(np.asarray(a), np.arange(start, stop), axis=dim)


def whole_groups(optim: dict, total: int) -> list:
    """A checkpoint's optimizer param_groups, after checking they hold `total` parameters
    (the whole model's, which a model-parallel rank holds a part of)."""
    groups = optim.get("param_groups", [])
    groups = json.loads(groups) if isinstance(groups, str) else groups
    n = sum(len(g.get("params", [])) for g in groups if isinstance(g, dict))
    if groups and n != total:
        raise UserError(f"checkpoint from another model: its optimizer has {n} parameters, this job's whole model "
                        f"{total}")
    return groups


def local_groups(groups: list, n: int) -> list:
    """The checkpoint's (first) parameter group's settings for an optimizer of n parameters."""
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(n))} for g in groups[:1]]


def _skeleton(tree: dict) -> dict:
    """The tree with every Pieces' values left out (shapes, dtypes and scalars stay)."""
    return {k: _skeleton(v) if isinstance(v, dict) else
            checkpoint.Pieces(v.shape, v.dtype, []) if isinstance(v, checkpoint.Pieces) else v
            for k, v in tree.items()}


def _merge(trees: list) -> dict:
    out: dict = {}
    for t in trees:
        for k, v in t.items():
            out[k] = _merge([out.get(k, {}), v]) if isinstance(v, dict) else out.get(k, v)
    return out


def rotate(path: Path, pos: Position, keep: int, log=None) -> None:
    """Rank 0, after writing `path` at `pos`: remove all but the newest `keep` checkpoints
    in its folder, never `path` itself, nor the last checkpoint written after a counted
    step: the oldest one at or after step `pos.counted` (the steps since were all skipped,
    so every later checkpoint holds the same parameters, further into a run that only
    skips; that one is where to go back to, e.g. with a lower optim.lr)."""
    found = checkpoint.list_checkpoints(path.parent)
    since = [p for p in found if pos.counted <= checkpoint.step_of(p) <= pos.step]
    protect = {path} | ({since[-1]} if since else set())
    checkpoint.prune(path.parent, keep, protect)
    if since and since[-1] not in found[:keep] and since[-1] != path and log is not None:
        log.info(f"keeping {since[-1].name} beyond output.keep = {keep}: the last checkpoint written after a "
                 f"counted step (step {pos.counted}; every step since was skipped)")


def _load_replica(step, replica: dict) -> None:
    """Put back a rank's own parameters and strategy state (after setup)."""
    load_model(step.model, replica["model"], "this rank's replica")
    if isinstance(step.strategy, Stateful):
        step.strategy.load_state_dict(replica.get("strategy", {}))


# -- reading and restoring --------------------------------------------------------------------

def load(path, world, probe: bool = True) -> dict:
    """Collective: a verified checkpoint tree, read by every rank (any failure is agreed).
    The ranks verify the file's blocks together, then (`probe`) rank 0 parses it in a
    child process (checkpoint.probe), so that a crafted file cannot crash the job's ranks
    (False: it was probed already); then every rank reads the tree, leaving /optim/state's
    arrays in the file (checkpoint.Slab: a sharded optimizer reads only its slices)."""
    path = Path(path)
    image = world.agree(checkpoint.verify, path, world.rank, world.size)
    if probe:
        world.agree(lambda: checkpoint.probe(path, image) if world.is_root else None)
    return world.agree(checkpoint.read, path, lazy=True, verified=image)


def _own_replica(tree: dict, world) -> dict | None:
    """This rank's replica where the checkpoint holds every rank's for this world size."""
    ranks = tree["ranks"]
    if len(ranks) != world.size or not all("replica" in r for r in ranks.values()):
        return None
    return ranks[str(world.rank)]["replica"]


def check_position(tree: dict, device, epochs: int | None = None, samples: int | None = None) -> None:
    """Step, epoch, sample position and random states must make sense for this job."""
    pos, problems = tree["position"], []
    if pos["step"] < 0:
        problems.append(f"step {pos['step']} < 0")
    if epochs is not None and not 0 <= pos["epoch"] <= epochs:
        problems.append(f"epoch {pos['epoch']} outside 0..{epochs} (train.epochs)")
    if samples is not None and not 0 <= pos["samples_in_epoch"] <= samples:
        problems.append(f"samples_in_epoch {pos['samples_in_epoch']} outside 0..{samples}")
    n_cpu = torch.get_rng_state().numel()
    for r, own in tree["ranks"].items():
        rng = own.get("rng", {})
        cpu, cuda = rng.get("torch_cpu"), rng.get("torch_cuda")
        if not isinstance(cpu, np.ndarray) or cpu.dtype != np.uint8 or cpu.shape != (n_cpu,):
            problems.append(f"rank {r}'s CPU random state is {getattr(cpu, 'shape', type(cpu).__name__)}, "
                            f"expected ({n_cpu},) uint8")
        if cuda is not None and (not isinstance(cuda, np.ndarray) or cuda.dtype != np.uint8 or cuda.ndim != 1):
            problems.append(f"rank {r}'s CUDA random state is not a uint8 vector")
        elif cuda is not None and device.type == "cuda" and cuda.size != torch.cuda.get_rng_state(device).numel():
            problems.append(f"rank {r}'s CUDA random state has {cuda.size} bytes, this GPU's has "
                            f"{torch.cuda.get_rng_state(device).numel()}")
        if problems:
            break
    if problems:
        raise UserError(f"checkpoint at step {pos['step']} does not fit this job: {'; '.join(problems)}")


def restore(step, tree: dict, *, model_id: str = "", schedule=None, log=None) -> Position:
    """Load a checkpoint tree into the (not yet set up) model and optimizer of `step` on
    this rank, after checking it fits. The checkpoint supplies state; hyperparameters
    (momentum, weight decay, betas, base lr, ...) are the optimizer's own, a changed one is
    logged. Where the checkpoint holds every rank's own replica and the world size is the
    same, each rank continues from its own (exact resume); otherwise every rank starts from
    the consolidated model and optimizer state. `schedule` (a closed-form LambdaLR) jumps
    to the step. Then `restore_strategy` after the strategy's setup, and `restore_rng`."""
    world, meta, root = step.world, tree["meta"], step.world.is_root and log is not None
    theirs = meta.get("model", "")
    if model_id and theirs and model_id not in (theirs, BUILTIN.get(theirs, ("",))[0]):
        raise UserError(f"checkpoint from another model: it was trained with {theirs!r}, this job "
                        f"builds {model_id!r} (model.factory / model.name)")
    own = _own_replica(tree, world)
    optim, changed = own["optim"] if own else tree["optim"], {}
    if (layout := step.stages or step.tensor) is not None:  # model parallel: its part of the whole model
        optim = layout.view(step, own["model"] if own else tree["model"], optim, theirs or "a model")
    else:
        load_model(step.model, own["model"] if own else tree["model"], theirs or "a model")
    if isinstance(step.strategy, Sharded):  # zero: this rank reads only its chunks of the state
        changed = step.strategy.load_optim_state(step.optimizer, optim)
    elif optim.get("state") or optim.get("param_groups"):
        changed = load_optimizer(step.optimizer, optim)
    if changed and root:
        log.info("optimizer settings from the job, not the checkpoint: "
                 + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    pos = tree["position"]
    if schedule is not None:  # the LR schedule is a closed form of the step (LambdaLR): jump to it in O(1)
        schedule.last_epoch = pos["step"] - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schedule.step()
    step.steps = pos["step"]
    if not step.precision.load_state_dict(tree.get("precision", {})) and step.precision.scaler is not None and root:
        log.info("the checkpoint holds no fp16 loss scale (another precision, or an older checkpoint): "
                 "the loss scale starts afresh")
    if meta.get("replicas_differ") and own is None and root:
        log.info(f"checkpoint written at {meta['world_size']} ranks, resuming at {world.size}: every rank "
                 "starts from the consolidated model and optimizer state")
    counted = meta.get("last_counted_step")  # absent (older checkpoints) or out of range: the step
    if not isinstance(counted, int) or isinstance(counted, bool) or not 0 <= counted <= pos["step"]:
        counted = None
    return Position(pos["step"], pos["epoch"], pos["samples_in_epoch"], tree, counted)


def restore_strategy(step, tree: dict, log=None) -> None:
    """Collective, after the strategy's setup (which makes the replicas equal): this rank's
    own parameters and strategy state where the checkpoint has them for this world size
    (exact resume), else the consolidated strategy state; then per-rank strategy state
    (RankStateful), which only a checkpoint of this world size can supply."""
    world, strategy = step.world, step.strategy
    own = _own_replica(tree, world)
    if own is not None:
        _load_replica(step, own)
    elif isinstance(strategy, Stateful):
        strategy.load_state_dict(tree.get("strategy", {}))
    if not isinstance(strategy, RankStateful):
        return
    ranks = tree["ranks"]
    if len(ranks) == world.size:
        strategy.load_rank_state_dict(ranks[str(world.rank)].get("strategy", {}))
        return
    strategy.load_rank_state_dict(None)
    dropped = sorted({k for r in ranks.values() for k in r.get("strategy", {})})
    if dropped and world.is_root and log is not None:
        log.warning(f"checkpoint written at {len(ranks)} ranks, resuming at {world.size}: its per-rank strategy "
                    f"state ({', '.join(dropped)}) cannot be mapped and is dropped")


def restore_rng(tree: dict, rank: int, device) -> None:
    """This rank's random streams as saved (CPU, and CUDA for GPU jobs), where the
    checkpoint has this rank (a job resumed on more ranks keeps its fresh seeds there)."""
    rng = tree["ranks"].get(str(rank), {}).get("rng", {})
    if "torch_cpu" in rng:
        torch.set_rng_state(torch.from_numpy(np.array(rng["torch_cpu"])))
    if device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(torch.from_numpy(np.array(rng["torch_cuda"], dtype=np.uint8)), device)
