"""A job's model split into pipeline stages (`[parallel] pipeline_stages = P`): what the
job runner, its Step and its checkpoints need to know about this rank's stage.

Every rank builds the whole model (seeded alike), cuts it into blocks, keeps its stage's
blocks (`Stages.module`) and remembers each kept tensor's name in the whole model and each
parameter's index in the whole model's optimizer, so checkpoints keep the layout of a run
without a pipeline (resumable at any P x D and without one) and evaluation runs through
the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import checkpoint, state
from ..errors import UserError
from ..sync.base import Sharded
from .pipeline import Pipeline, check, measure, split, tie
from ..comm import p2p

def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model as a sequence of blocks: its own `pipeline_blocks()` (the gpt), or the
    children of an nn.Sequential (mlp, cnn, a user's Sequential); a block without
    parameters (an activation, a flatten) joins the block before it (the first: the one
    after), so every stage has parameters to train."""
    if hasattr(model, "pipeline_blocks"):
        blocks = list(model.pipeline_blocks())
    elif isinstance(model, torch.nn.Sequential):
        blocks = list(model)
    else:
        raise UserError(f"parallel.pipeline_stages: the model ({type(model).__name__}) is not a sequence of "
                        "blocks (an nn.Sequential, or a model with pipeline_blocks())")
    groups: list[list] = []
    for b in blocks:
        has = any(True for _ in b.parameters())
        if groups and (not has or not any(True for m in groups[-1] for _ in m.parameters())):
            groups[-1].append(b)
        else:
            groups.append([b])
    if not any(True for _ in model.parameters()):
        raise UserError("parallel.pipeline_stages: the model has no parameters to split")
    return [g[0] if len(g) == 1 else torch.nn.Sequential(*g) for g in groups]


@dataclass
class Stages:
    """This rank's stage: `pipe` (its Pipeline: module, schedule, communicators), the
    data-parallel World of its replicas (`data`), and the names: `names[id(tensor)]` its
    names in the whole model's state_dict, `index[id(param)]` its position in the whole
    model's optimizer, `total` the whole model's parameter count (tensors)."""

    pipe: Pipeline
    data: object  # comm.World of this stage's D replicas
    replica: int
    replicas: int
    names: dict
    index: dict
    total: int
    total_params: int  # values in the whole model

    @property
    def module(self) -> torch.nn.Module:
        return self.pipe.module

    def owned(self, p) -> bool:
        return self.pipe.owned(p)

    def parts(self, step) -> dict:
        """Collective (zero's optim_state): this stage's part of the whole model's
        checkpoint tree, as checkpoint.Pieces under the whole model's names and optimizer
        indices: its tensors from its first replica (each replica has them all), the
        optimizer state from every replica under zero (each its chunks), else from the
        first. (state.save)"""
        opt = step.optimizer
        params, lead = [p for g in opt.param_groups for p in g["params"]], self.data.rank == 0
        whole = lambda a: checkpoint.Pieces(a.shape, a.dtype, [(0, a.reshape(-1))])  # noqa: E731
        model = {}
        if lead:
            sd = step.model.state_dict()
            for k, full in self.state_names().items():
                for name in full:
                    model[name] = whole(sd[k].detach().cpu().numpy())
        if isinstance(step.strategy, Sharded):
            local, params = step.strategy.optim_state(opt)["state"], [p for g in step.strategy.groups for p in g]
        else:
            local = {i: {k: whole(a) if a.ndim else a for k, a in e.items()}
                     for i, e in state.optim_state(opt)["state"].items()} if lead else {}
        mine = {str(self.index[id(params[int(i)])]): e for i, e in local.items() if self.owned(params[int(i)])}
        return {"model": model, "optim": {"state": mine}}

    def view(self, step, arrays: dict, optim: dict, what: str) -> dict:
        """Load this stage's tensors from the whole model's (`arrays`, by name; only those
        are read) and return the optim tree of its parameters, in its optimizer's order,
        after checking the checkpoint is of the whole model this job splits. (state.restore)"""
        groups = state.whole_groups(optim, self.total)
        mine = {}
        for k, names in self.state_names(owned=False).items():
            a = next((arrays[n] for n in names if n in arrays), None)
            if a is None:
                raise UserError(f"checkpoint from another model: it holds no {names[0]} (this job builds {what})")
            mine[k] = a
        state.load_model(step.model, mine, what)
        params = [p for g in step.optimizer.param_groups for p in g["params"]]
        if isinstance(step.strategy, Sharded) and getattr(step.strategy, "ready", False):
            params = [p for g in step.strategy.groups for p in g]
        given = optim.get("state", {})
        local = {str(i): given[str(self.index[id(p)])] for i, p in enumerate(params) if str(self.index[id(p)]) in given}
        return {"state": local, "param_groups": state.local_groups(groups, len(params))}

    def state_names(self, owned: bool = True) -> dict[str, list[str]]:
        """This stage's state_dict names -> the whole model's names of that tensor (owned:
        tied copies held by a later stage left out, the first stage holding one saves it)."""
        out = {}
        for k, t in self.module.state_dict(keep_vars=True).items():
            if owned and isinstance(t, torch.nn.Parameter) and not self.owned(t):
                continue
            out[k] = self.names[id(t)]
        return out


def split_model(model: torch.nn.Module, cfg, world, sample: torch.Tensor, loss_fn) -> Stages:
    """Collective: cut `model` (built alike on every rank) into cfg.pipeline_stages stages
    over the world (consecutive ranks form a pipeline, D = N / P of them), balanced by each
    block's forward + backward time on `sample` as rank 0 measures it, or by cfg.split;
    every rank decides every setting alike (agreed errors) before the first send."""
    from ..comm import World

    names: dict = {}  # (a tied tensor has several names, as in the whole model's checkpoint)
    for k, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(k)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}

    def settle():
        blocks = blocks_of(model)
        check(len(blocks), world.size, cfg.pipeline_stages, cfg.micro_batches, cfg.schedule, list(cfg.split) or None)
        return blocks, (measure(blocks, sample) if world.is_root and not cfg.split else None)
    blocks, costs = world.agree(settle)
    parts = split(blocks, cfg.pipeline_stages, list(cfg.split) or None, world.bcast(costs))
    pipe_comm, data_comm = p2p.grid(world.comm, cfg.pipeline_stages)
    module = torch.nn.Sequential(*parts[pipe_comm.Get_rank()])
    pipe = Pipeline(module, pipe_comm, micro_batches=cfg.micro_batches, schedule=cfg.schedule, loss_fn=loss_fn,
                    data=None, tied=tie(parts, pipe_comm))
    data = World.create(data_comm)
    data.parent, data.direct_cuda = world, world.direct_cuda
    data_comm.Free()
    return Stages(pipe, data, data.rank, data.size, names, index, len(params), sum(p.numel() for p in params))


@dataclass
class TensorSplit:
    """This rank's part of a tensor-parallel job (`[parallel] tensor = T`): `module` (its
    slices of the built-in gpt), the World of its T tensor ranks (`tp`: consecutive ranks,
    on one node where they fit) and of its D replicas (`data`); `index[name]` the
    whole model's optimizer index of each parameter's unsplit tensor, `total` the whole
    model's parameter count (tensors) and `total_params` (values)."""

    module: torch.nn.Module
    tp: object
    data: object
    index: dict
    total: int
    total_params: int
    shapes: dict  # the unsplit tensors' shapes, by their names in the whole model

    @property
    def counts(self) -> bool:
        """Whether this rank's loss and samples count (the T ranks of a replica share them)."""
        return self.tp.rank == 0

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The job's language-model loss (tasks: summed over samples of the mean over each
        sample's positions) from this rank's logits shard, the logits never gathered."""
        from .tensor import vocab_parallel_cross_entropy

        per_sample = y[0].numel() if len(y) else 1
        return vocab_parallel_cross_entropy(out, y, self.tp, reduction="sum") / per_sample

    def replicated(self, name: str) -> bool:
        return self.module.names()[name][1] is None

    def parts(self, step) -> dict:
        """This rank's part of the whole model's checkpoint tree (its replica's first copy
        only): each parameter's slice as checkpoint.Pieces of the unsplit tensor, its
        optimizer state likewise; replicated parameters from tensor rank 0. (state.save)"""
        if self.data.rank != 0:
            return {"model": {}, "optim": {"state": {}}}
        layout, named = self.module.names(), list(self.module.named_parameters())
        local = {n: i for i, (n, _) in enumerate(named)}  # (the optimizer's order: model.parameters())
        model, mine = {}, {}
        opt_state = state.optim_state(step.optimizer)["state"]
        for name, p in named:
            full, dim, start, _ = layout[name]
            if dim is None and not self.counts:
                continue
            shape, a = self.shapes[full], p.detach().cpu().numpy()
            for alias in [full] + (["lm_head.weight"] if full == "wte.weight" and self.module.tied else []):
                model.setdefault(alias, checkpoint.Pieces(shape, a.dtype, [])).pieces.extend(
                    state.pieces_of(shape, dim, start, a))
            for k, v in opt_state.get(str(local[name]), {}).items():
                entry = mine.setdefault(str(self.index[name]), {})
                if v.ndim:
                    entry.setdefault(k, checkpoint.Pieces(shape, v.dtype, [])).pieces.extend(
                        state.pieces_of(shape, dim, start, v))
                else:
                    entry[k] = v
        return {"model": model, "optim": {"state": mine}}

    def view(self, step, arrays: dict, optim: dict, what: str) -> dict:
        """Load this rank's slices of the whole model's tensors (`arrays`, by name) and
        return the optim tree of its parameters' slices, in its optimizer's order. (state.restore)"""
        groups = state.whole_groups(optim, self.total)
        layout, mine, local, named = self.module.names(), {}, {}, list(self.module.named_parameters())
        given = optim.get("state", {})
        for i, (name, p) in enumerate(named):
            full, dim, start, stop = layout[name]
            if full not in arrays or tuple(np.shape(arrays[full])) != self.shapes[full]:
                raise UserError(f"checkpoint from another model: its {full} is "
                                f"{tuple(np.shape(arrays.get(full, ())))}, this job's {self.shapes[full]} ({what})")
            mine[name] = state.narrow(arrays[full], self.shapes[full], dim, start, stop)
            local[str(i)] = {k: state.narrow(v, self.shapes[full], dim, start, stop) if len(np.shape(v)) else v
                             for k, v in given.get(str(self.index[name]), {}).items()}
        by_id = {id(p): mine[name] for name, p in named}  # (a tied tensor is in the state_dict twice)
        state.load_model(step.model, {k: by_id[id(t)] for k, t in step.model.state_dict(keep_vars=True).items()},
                         what)
        return {"state": {k: v for k, v in local.items() if v}, "param_groups": state.local_groups(groups, len(named))}

    def free(self) -> None:
        self.tp.free()
        self.data.free()


def split_tensor(model: torch.nn.Module, cfg, world) -> TensorSplit:
    """Collective: the built-in gpt `model` (built alike on every rank) split over
    cfg.tensor consecutive ranks (heads, MLP width and vocabulary; tp_gpt), D = N / T
    replicas of it; T must divide the heads and the vocabulary (one agreed line)."""
    from ..comm import World
    from .tp_gpt import TensorParallelGPT, check_tp_sizes

    def settle():
        if world.size % cfg.tensor:
            raise UserError(f"parallel.tensor = {cfg.tensor} must divide the world size {world.size}")
        if not hasattr(model, "wte") or not hasattr(model, "blocks"):
            raise UserError(f"parallel.tensor = {cfg.tensor}: {type(model).__name__} has no tensor-parallel "
                            "layers (the built-in gpt has: model.name = 'gpt')")
        check_tp_sizes(model.wte.num_embeddings, model.blocks[0].attn.n_head, model.wte.embedding_dim, cfg.tensor)
    world.agree(settle)
    tp_comm, data_comm = p2p.grid(world.comm, cfg.tensor)
    tp, data = World.create(tp_comm), World.create(data_comm)
    for w in (tp, data):
        w.parent, w.direct_cuda = world, world.direct_cuda
    tp_comm.Free()
    data_comm.Free()
    full = [n for n, _ in model.named_parameters()]
    module = TensorParallelGPT.from_gpt(model, tp=tp)
    index = {name: full.index(whole) for name, (whole, *_) in module.names().items()}
    return TensorSplit(module, tp, data, index, len(full), sum(p.numel() for p in model.parameters()),
                       {k: tuple(v.shape) for k, v in model.state_dict().items()})
