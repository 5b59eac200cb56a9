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

import torch

from ..errors import UserError
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
