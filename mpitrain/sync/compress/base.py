"""The compressor protocol and registry: the strategies that compress (allreduce; zero
stage 1) talk to gradient compressors only through this (as train.py talks to strategies
through sync/base.py), and keep their compressors' checkpoint state with `CompressedState`.

A compressor is, like a torch DDP comm hook, state plus a function, made once per
gradient bucket:

    @register("topk")
    class TopK(Compressor):
        Options = TopKOptions           # frozen dataclass (options.opt fields): the keys of
                                        # [sync.allreduce.compress] besides `kind`
        bench = ("topk 1%", {"ratio": 0.01})   # the `mpitrain bench model` variant, or None
        def __init__(self, options, buf, layout, world): ...
        def reduce_(self, buf, step): ...      # Collective: buf := the SUM over ranks, in place
        @classmethod
        def wire(cls, numel, matrices, world_size, options): ...   # what reduce_ sends

`buf` is the bucket's flat gradient buffer, `layout` the (offset, shape) of each parameter
in it, `world` the World whose collectives it uses (a private communicator of the
bucket reduction; run on the communication thread when the reduction overlaps backward).
The loss is pre-scaled, so the sum over ranks is the mean gradient. `reduce_` is called
with the training step (e.g. for PowerSGD's start_step).

State, for checkpoints (numpy arrays; keys carry the kind, so another compressor's state
never loads): `state_dict()` the arrays equal on every rank (PowerSGD's Q),
`rank_state_dict()` this rank's own (error-feedback residuals), and
`load_state_dict(d)` / `load_rank_state_dict(d)` -> bool: False when `d` does not fit
(other names, shapes or dtypes): nothing is changed then, so a compressor just made starts
afresh. The base class keeps these for the tensors named in `self.shared` / `self.own`,
and `commit()` / `rollback()`: a copy of that state as of the last counted step, put back
when a step is skipped (an fp16 overflow is found only after the reduction, on every rank,
so each compressor's state returns bitwise to what it was before the step). The gradient
a compressor sees is unscaled (GradBuckets divides the fp16 loss scale out before
`reduce_` and multiplies it back after), so residuals stay in the gradient's own units
when the scale grows or backs off.

`wire(numel, matrices, world_size, options)` declares what `reduce_` hands to MPI for a
bucket of `numel` values whose weight matrices are `matrices` ((rows, cols) of the
parameters with >= 2 dims): a list of (collective, bytes this rank sends per call) with
collective one of "allreduce" (the buffer), "allgather" (this rank's part), "alltoall"
(this rank's whole send buffer) — what `World.bytes_sent()` counts, and what
`bench.costmodel.comm_seconds(..., wire=...)` turns into seconds.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from ...options import opt

REGISTRY: dict[str, type] = {}
COLLECTIVES = ("allreduce", "allgather", "alltoall")
PAYLOADS = ("fp32", "fp16", "bf16")
PAYLOAD_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
Layout = list[tuple[int, torch.Size]]
Wire = list[tuple[str, float]]


def register(name: str):
    """Class decorator: make a compressor selectable as [sync.allreduce.compress] (or
    [sync.zero.compress]) kind = name."""
    def deco(cls):
        for attr in ("Options", "reduce_", "wire"):
            if not hasattr(cls, attr):
                raise TypeError(f"compressor {name!r} must declare {attr}")
        if name == "none" or name in REGISTRY:
            raise TypeError(f"compressor name {name!r} is taken")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def payload_opt(what: str):
    """The `payload` option of compressors that can send half-precision values."""
    return opt("fp32", choices=PAYLOADS,
               help=f"{what} on the wire: fp16/bf16 halve those bytes (sums are still taken in float32, "
                    "as kind = fp16/bf16 do; fp16 with an agreed power-of-two scale)")


def matrix_shape(shape) -> tuple[int, int]:
    """(rows, cols) of a parameter seen as a matrix (first dim x the rest)."""
    numel = math.prod(shape)
    return (shape[0], numel // shape[0]) if len(shape) >= 2 else (numel, 1)


class Compressor:
    """Base class: the state methods for the tensors in `self.shared` and `self.own`."""

    Options: ClassVar[type]
    name: ClassVar[str]
    bench: ClassVar[tuple[str, dict] | None] = None

    def __init__(self, options, buf: torch.Tensor, layout: Layout, world):
        self.options, self.world = options, world
        self.shared: dict[str, torch.Tensor] = {}
        self.own: dict[str, torch.Tensor] = {}

    def reduce_(self, buf: torch.Tensor, step: int) -> None:
        raise NotImplementedError

    @classmethod
    def wire(cls, numel: int, matrices, world_size: int, options) -> Wire:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return _arrays(self.shared, self.name)

    def rank_state_dict(self) -> dict[str, np.ndarray]:
        return _arrays(self.own, self.name)

    def load_state_dict(self, arrays: dict) -> bool:
        return _load(self.shared, arrays, self.name)

    def load_rank_state_dict(self, arrays: dict) -> bool:
        return _load(self.own, arrays, self.name)

    def _state(self) -> list[torch.Tensor]:
        return [*self.shared.values(), *self.own.values()]

    def commit(self) -> None:
        """Keep a copy of the state as it is now (after a counted step, setup or a load)."""
        state = self._state()
        if getattr(self, "_committed", None) is None or len(self._committed) != len(state):
            self._committed = [t.detach().clone() for t in state]
        else:
            with torch.no_grad():
                for kept, t in zip(self._committed, state):
                    kept.copy_(t)

    def rollback(self) -> None:
        """Put back the state of the last `commit` (a skipped step), bit for bit."""
        with torch.no_grad():
            for kept, t in zip(self._committed or [], self._state()):
                t.copy_(kept)


class CompressedState:
    """Mixin for a strategy that runs one compressor per gradient bucket (allreduce; zero
    stage 1): the compressors' checkpoint state (sync.base's Stateful and RankStateful)
    and their commit / rollback. The strategy provides `compressors` (one per bucket, in
    bucket order, the same on every rank), `options.compress`, `world`, `log` and `name`.

    Trees: {"compress": {"<bucket>": arrays}}, {} where no compressor has any; the arrays
    equal on every rank (PowerSGD's Q) in `state_dict`, this rank's own (error-feedback
    residuals) in `rank_state_dict`. What is missing or does not fit starts afresh, named
    in one info line on rank 0."""

    compressors: list

    def state_dict(self) -> dict:
        """The compressors' state equal on every rank: {"compress": {"<bucket>": arrays}} or {}."""
        return self._tree("state_dict")

    def rank_state_dict(self) -> dict:
        """This rank's compressor state (residuals): {"compress": {"<bucket>": arrays}} or {}."""
        return self._tree("rank_state_dict")

    def load_state_dict(self, tree: dict) -> None:
        """After setup: the compressors' shared state; what is missing or does not fit starts
        afresh (named in one info line on rank 0 by load_rank_state_dict, which follows)."""
        self._fresh = self._load(tree, "load_state_dict", "its shared state (PowerSGD's Q) starts afresh")

    def load_rank_state_dict(self, tree: dict | None) -> None:
        """After load_state_dict: this rank's compressor state; None (written at another
        world size): it stays as set up (zero residuals); what is missing or does not fit
        starts afresh. One info line on rank 0 names what started afresh."""
        fresh = getattr(self, "_fresh", [])
        if tree is not None:
            fresh += self._load(tree, "load_rank_state_dict", "error feedback starts at zero")
        self._fresh = []
        self._commit()
        if fresh and self.log and self.world.is_root:
            self.log.info(f"{self.name}: the checkpoint holds no {self.options.compress.kind} state (written "
                          f"before it was saved, or with other compress or bucket options): {'; '.join(fresh)}")

    def _commit(self) -> None:
        """Every compressor keeps its state as it is now (after setup, a load, a counted step)."""
        for c in self.compressors:
            c.commit()

    def _rollback(self) -> None:
        """Every compressor's state back to the last `_commit`, bit for bit (a skipped step)."""
        for c in self.compressors:
            c.rollback()

    def _tree(self, method: str) -> dict:
        per = {str(i): getattr(c, method)() for i, c in enumerate(self.compressors)}
        per = {k: v for k, v in per.items() if v}
        return {"compress": per} if per else {}

    def _load(self, tree, method: str, fresh: str) -> list[str]:
        """Load each bucket's part; returns what started afresh ([] if everything fit)."""
        got = tree.get("compress", {}) if isinstance(tree, dict) else {}
        got = got if isinstance(got, dict) else {}
        missed = [i for i, c in enumerate(self.compressors) if not getattr(c, method)(got.get(str(i), {}))]
        if not missed:
            return []
        return [f"{'bucket' if len(missed) == 1 else 'buckets'} {', '.join(map(str, missed))}: {fresh}"]


def _arrays(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, np.ndarray]:
    """Copies of named tensors as arrays, keyed KIND_NAME."""
    return {f"{kind}_{k}": t.detach().cpu().numpy().copy() for k, t in tensors.items()}


def _load(tensors: dict[str, torch.Tensor], arrays, kind: str) -> bool:
    """Copy arrays[KIND_NAME] into every named tensor when `arrays` holds exactly those
    names with the same shapes and dtypes (True); else change nothing (False)."""
    if not isinstance(arrays, dict):
        return False
    got = {k: np.asarray(v) for k, v in arrays.items()}
    want = {f"{kind}_{k}": t for k, t in tensors.items()}
    if set(got) != set(want) or any(got[k].shape != tuple(t.shape) or str(got[k].dtype) != str(t.dtype)[6:]
                                    for k, t in want.items()):  # torch.float32 vs float32
        return False
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(torch.from_numpy(np.array(got[k])))
    return True
