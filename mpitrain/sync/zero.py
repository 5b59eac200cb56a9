"""ZeRO stages 1 and 2 (Rajbhandari et al. 2020): data parallelism with the optimizer state
(stage 1) and the gradients (stage 2) sharded over the ranks.

The optimizer's parameters are packed per parameter group into flat buckets (the model's
parameters become views of them); rank r owns the r-th of N contiguous chunks of every
bucket (ceil(n/N) values each, the last ones shorter: no padded copy). Each step:

    backward     a complete bucket's gradient is reduce-scattered (MPI_Reduce_scatter, the
                 SUM; the loss is pre-scaled, so it is the mean): rank r receives the
                 gradient of its chunk, on the communication thread while backward goes on
    optimizer    the user's optimizer steps only this rank's chunks (it holds them as its
                 parameters; its state is the chunks' state: 1/N of it)
    after_step   every bucket's parameters are allgathered (MPI_Allgatherv, in place)

2 Ψ bytes per step, as an allreduce. Stage 1 keeps each bucket's full gradient buffer (the
model's .grad are views of it); stage 2 copies a complete bucket's gradients into a
buffer that lives only until its reduce-scatter is done (the .grad are released), at
most two buckets in flight, so a rank holds 1/N of the gradients plus those.

With `[sync.zero.compress]` (stage 1 only: every compressor gives each rank the whole
averaged gradient, which stage 2 would not hold), a bucket's compressor (sync/compress,
the one allreduce runs per bucket) reduces its full gradient buffer in place instead of
the reduce-scatter, and this rank's chunk of it becomes the shard's gradient: optimizer
memory is saved, gradient memory is not. The compressors' state is checkpointed as
allreduce's (compress.base.CompressedState).

Clipping and fp16 overflow see one global figure: the squared norm of the chunks' gradients
summed over ranks in one scalar allreduce (inf/NaN if any rank's chunk is non-finite).

Checkpoints hold the optimizer state in the global layout of an unsharded optimizer (the
/optim tree `allreduce` writes), so a zero checkpoint resumes at any world size, and under
allreduce, and the other way round; no rank holds all of it: each writes its chunks' pieces
into the file and reads back only its chunks (state.save, checkpoint.Slab).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .. import checkpoint
from ..comm import buffers, counts
from ..comm.collectives import resolve_overlap
from ..errors import UserError
from ..options import opt
from . import compress
from .compress.base import CompressedState, payload_opt
from .compress.half import HALF, chunk_counts, half_reduce_scatter
from .base import register

# torch optimizers whose update of a value depends only on that value's own gradient and
# state (and per-parameter scalars such as the step count): right on slices of flat buckets
OFFLOAD_ON_CPU = False  # tests: offload's copies between two host tensors, where there is no GPU
ELEMENTWISE = tuple(getattr(torch.optim, n) for n in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam",
                                                       "Adagrad", "Adadelta", "RMSprop", "Rprop", "ASGD"))


def _flat(v, src: slice) -> torch.Tensor:
    """Values src of a state tensor flattened: a tensor, an array or a checkpoint.Slab
    (read from the file: only these values)."""
    if isinstance(v, checkpoint.Slab):
        return torch.from_numpy(v.read(src.start, src.stop))
    if torch.is_tensor(v):
        return v.reshape(-1)[src]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(v).reshape(-1)[src]))


def _dtype(v) -> torch.dtype:
    return v.dtype if torch.is_tensor(v) else torch.from_numpy(np.zeros(0, v.dtype)).dtype


@dataclass(frozen=True)
class Options:
    stage: int = opt(2, choices=(1, 2), help="1: optimizer state sharded over the ranks; 2: the gradients too "
                                             "(each bucket's buffer freed after its reduce-scatter)")
    bucket_mb: float = opt(25.0, gt=0.0, help="bucket size: one reduce-scatter and one allgather each")
    overlap: str = opt("auto", choices=("auto", "thread", "none"),
                       help="thread: each bucket's reduce-scatter on a comm thread during backward; auto: "
                            "thread when each rank has >= 2 cores or a GPU, else none")
    payload: str = payload_opt("the gradients' reduce-scatter (parameters are gathered in float32)")
    offload: bool = opt(False, help="ZeRO-Offload (GPU runs): this rank's optimizer chunks, their state and "
                                    "update in host memory; the gradient chunk arrives there, the parameter "
                                    "chunk goes back to the GPU before the allgather")
    compress: compress.Compress = opt(compress.Compress(),
                                      help="[sync.zero.compress]: kind and that compressor's keys, as "
                                           "[sync.allreduce.compress]; stage 1 only (each bucket's whole gradient "
                                           "compressed and summed instead of reduce-scattered)")

    def __post_init__(self):
        kind = self.compress.kind
        if kind == "none":
            return
        if self.stage != 1:
            raise UserError(f"sync.zero.compress.kind = {kind!r} gives every rank the whole averaged gradient: "
                            f"only with sync.zero.stage = 1 (which then saves no gradient memory)")
        if self.payload != "fp32":
            raise UserError(f"sync.zero.payload = {self.payload!r} is the reduce-scatter's, which "
                            f"sync.zero.compress.kind = {kind!r} replaces: set sync.zero.payload = 'fp32' (a "
                            f"compressor's own payload, where it has one: sync.zero.compress.payload)")


def chunks(n: int, size: int) -> tuple[list[int], list[int]]:
    """(counts, displacements) of `size` contiguous chunks of n values: ceil(n / size)
    each, the last ones short or empty (the layout of a half-payload reduce-scatter)."""
    counts = chunk_counts(n, size)
    return counts, [sum(counts[:r]) for r in range(size)]


class _Bucket:
    """Parameters of one group packed into `flat`; this rank's chunk is `shard` (an
    optimizer parameter sharing flat's storage)."""

    def __init__(self, params: list, group: int, rank: int, size: int, stage: int, offload: bool):
        self.params, self.group = params, group
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        n = self.offsets[-1]
        self.counts, self.displs = chunks(n, size)
        self.lo, self.hi = self.displs[rank], self.displs[rank] + self.counts[rank]
        p0 = params[0]
        self.flat = torch.empty(n, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for p, o in zip(params, self.offsets):
                self.flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.flat[o:o + p.numel()].view_as(p)
        chunk = self.flat[self.lo:self.hi]
        # the optimizer's parameter: flat's own storage, or (offload) a host copy
        self.shard = torch.nn.Parameter(chunk.detach().to("cpu", copy=True).pin_memory() if offload and chunk.is_cuda
                                        else chunk.detach().clone() if offload else chunk)
        self.offload = offload
        self.shard.grad = torch.zeros_like(self.shard)
        # stage 1: the model's .grad are views of one persistent buffer
        self.grad = torch.zeros_like(self.flat) if stage == 1 else None
        self.views = [self.grad[o:o + p.numel()].view_as(p) for p, o in zip(params, self.offsets)] \
            if self.grad is not None else []
        for p, g in zip(params, self.views):
            if p.grad is not None:
                g.copy_(p.grad)
            p.grad = g

    def pieces(self):
        """(parameter, slice of it in this rank's chunk, slice of the chunk) for each
        parameter that overlaps the chunk."""
        for p, o in zip(self.params, self.offsets):
            a, b = max(o, self.lo), min(o + p.numel(), self.hi)
            if a < b:
                yield p, slice(a - o, b - o), slice(a - self.lo, b - self.lo)


@register("zero")
class ZeroStrategy:
    """Optimizer state (stage 1) and gradients (stage 2) sharded over the ranks; the
    parameters stay whole on every rank. Collective: setup, after_backward, after_step,
    skip_step, grad_sq_norm, optim_state. With [sync.zero.compress] (stage 1) the object
    made is a CompressedZero (below), which also keeps its compressors' state."""

    Options = Options
    sums_gradients = True
    replicas_differ = False  # every rank holds the same whole parameters

    def __new__(cls, options: Options, world, log=None):
        # with a compressor: the subclass that also keeps its state (Stateful, RankStateful,
        # Scaled); without, no strategy state at all (this class is neither)
        if cls is ZeroStrategy and options.compress.kind != "none":
            cls = CompressedZero
        return super().__new__(cls)

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log
        self.buckets: list[_Bucket] = []
        self.compressors: list = []  # one per bucket with [sync.zero.compress] (CompressedZero.setup)
        self._step: int | None = None  # the step of the next reduction, for the compressors
        self._scale: torch.Tensor | None = None  # the fp16 loss scale the compressors divide out
        self.ready = False
        self.groups: list[list[torch.nn.Parameter]] = []  # the optimizer's own parameters, per group
        self.paused = False
        self._thread = None
        self._pending: dict | None = None  # a checkpoint's state restored before setup (load_optim_state)

    # -- setup ---------------------------------------------------------------------------
    def setup(self, model, optimizer, resources):
        o, world = self.options, self.world
        world.raise_any(self._unfit(model, optimizer))  # decided before the first collective of its own
        world.broadcast_module(model)
        self.comm = world.comm.Dup()
        self._world = dataclasses.replace(world, comm=self.comm)  # (the half payload's collectives)
        resources.callback(self.close)
        self.groups = [list(g["params"]) for g in optimizer.param_groups]
        limit = o.bucket_mb * 2**20
        for gi, params in enumerate(self.groups):
            cur: list = []
            for p in reversed([p for p in params if p.requires_grad]):  # backward order, roughly
                if cur and sum(q.numel() * q.element_size() for q in cur) + p.numel() * p.element_size() > limit:
                    self.buckets.append(_Bucket(cur, gi, world.rank, world.size, o.stage, o.offload))
                    cur = []
                cur.append(p)
            if cur:
                self.buckets.append(_Bucket(cur, gi, world.rank, world.size, o.stage, o.offload))
        self.bucket_of = {p: (b, i) for b, bk in enumerate(self.buckets) for i, p in enumerate(bk.params)}
        self._shard(optimizer, self._pending if self._pending is not None else self._full_state(optimizer))
        self._pending = None
        self.ready = True
        on_gpu = next(model.parameters()).is_cuda
        self.overlap = resolve_overlap(o.overlap, world.cores_per_rank(), on_gpu, world.thread_multiple)
        if self.overlap == "nonblocking":
            self.overlap = "thread" if world.thread_multiple else "none"
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.bucket_of]
        self._reset()
        if self.overlap == "thread" and self.buckets:
            self._work, self._done = queue.SimpleQueue(), [threading.Event() for _ in self.buckets]
            self._errors: list = []
            self._thread = threading.Thread(target=self._comm_loop, name="mpitrain-zero", daemon=True)
            self._thread.start()
        if self.log and world.is_root:
            total = sum(b.flat.numel() for b in self.buckets)
            self.log.info(f"zero: stage {o.stage}, {len(self.buckets)} bucket{'s' if len(self.buckets) != 1 else ''} "
                          f"({total:,} values, {total / world.size:,.0f} per rank), overlap {self.overlap}"
                          + (", optimizer in host memory (offload)" if o.offload else "")
                          + (f", compress {o.compress.kind} per bucket (the whole gradient on every rank: stage 1 "
                             f"+ compression saves optimizer memory, no gradient memory)"
                             if o.compress.kind != "none" else ""))

    def _unfit(self, model, optimizer) -> str | None:
        """Why this model and optimizer cannot be sharded (decided on every rank alike)."""
        if not isinstance(optimizer, ELEMENTWISE):
            return (f"sync.strategy = 'zero' steps each rank's optimizer on slices of flattened parameters, "
                    f"right only for elementwise optimizers (SGD, Adam, AdamW, ...), not {type(optimizer).__name__}")
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            return "sync.strategy = 'zero': the optimizer has no trainable parameters"
        model_params = {id(p) for p in model.parameters()}
        if any(id(p) not in model_params for p in params):
            return "sync.strategy = 'zero': the optimizer holds tensors that are not the model's parameters"
        if any(p.dtype != torch.float32 for p in params):
            kinds = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
            return (f"sync.strategy = 'zero' keeps float32 parameters (train.precision = 'bf16'/'fp16' computes in "
                    f"half precision on float32 master weights); the model has {', '.join(kinds)} ones")
        if len({p.device for p in params}) > 1:
            return "sync.strategy = 'zero': the model's parameters are on more than one device"
        if self.options.offload and not params[0].is_cuda and not OFFLOAD_ON_CPU:
            return ("sync.zero.offload = true moves the optimizer to host memory for GPU runs; this run's "
                    "parameters are in host memory already (set it to false, or train.device = 'cuda')")
        n = sum(p.numel() for p in params)
        big = max((p.numel() for p in params), default=0)
        if max(big, self.options.bucket_mb * 2**20 / 4) > counts.MAX_COUNT:
            return (f"sync.strategy = 'zero': buckets of more than {counts.MAX_COUNT:,} values (a parameter of "
                    f"{big:,}, or sync.zero.bucket_mb = {self.options.bucket_mb:g}) exceed one MPI call's count")
        if n < self.world.size:
            return f"sync.strategy = 'zero': {n} trainable values cannot be sharded over {self.world.size} ranks"
        return None

    # -- the optimizer's state: whole parameters <-> this rank's chunks --------------------------
    def _full_state(self, opt) -> dict:
        """The optimizer's state keyed by the model's parameters (as a restore before setup
        loaded it), or {}."""
        state = opt.state
        return {p: dict(state[p]) for g in self.groups for p in g if p in state and state[p]}

    def _shard(self, opt, full: dict) -> None:
        """Make the optimizer hold this rank's chunks as its parameters, with the chunks of
        `full` (state per whole parameter) as their state."""
        for gi, g in enumerate(opt.param_groups):
            g["params"] = [b.shard for b in self.buckets if b.group == gi]
        opt.state.clear()
        for b in self.buckets:
            given = [full[p] for p in b.params if p in full]
            if not given:
                continue
            st = {}
            for k, v in given[0].items():
                if len(v.shape) and tuple(v.shape) == tuple(b.params[0].shape):
                    flat = None
                    for p, src, dst in b.pieces():
                        if k in full.get(p, {}):  # (a parameter without state: zeros)
                            piece = _flat(full[p][k], src)
                            if flat is None:
                                flat = torch.zeros_like(b.shard, dtype=piece.dtype)
                            flat[dst].copy_(piece)
                    st[k] = flat if flat is not None else torch.zeros_like(b.shard, dtype=_dtype(v))
                elif torch.is_tensor(v):  # per-parameter scalars (the step count): the same for every parameter
                    st[k] = v.clone()
                else:  # (a checkpoint's: as state.load_optimizer makes them)
                    a = np.asarray(v)
                    st[k] = torch.tensor(float(a)) if k == "step" else torch.tensor(a.item(), device=b.shard.device)
            opt.state[b.shard] = st

    def load_optim_state(self, opt, tree: dict) -> dict:
        """A checkpoint's optimizer state (the unsharded layout; its arrays may be
        checkpoint.Slab, left in the file): this rank reads only its chunks of it, checked
        against the whole parameters first. Before setup it is kept for setup to shard.
        Returns the hyperparameters that differed (state.optim_groups). Local."""
        from .. import state  # (state imports the strategies' protocols)

        params = [p for g in self.groups for p in g] if self.ready else [p for g in opt.param_groups for p in g["params"]]
        groups = self.groups if self.ready else [g["params"] for g in opt.param_groups]
        full = {params[i]: entries for i, entries in state.optim_entries(groups, tree).items()}
        changed = state.optim_groups(opt, tree)
        if not self.ready:
            self._pending = full
            return changed
        self._shard(opt, full)
        with torch.no_grad():
            for bk in self.buckets:
                if bk.offload:  # the model was loaded too: the host chunks follow it
                    bk.shard.copy_(bk.flat[bk.lo:bk.hi])
        return changed

    def optim_state(self, opt) -> dict:
        """Collective: the optimizer's state in the layout of an unsharded optimizer (the
        tree state.optim_state makes: {"state": {index: {key: array}}, "param_groups":
        JSON}) where every state tensor is a checkpoint.Pieces holding this rank's pieces
        of it (its chunks' values): each rank writes its own (state.save)."""
        world = self.world
        index = {p: i for i, p in enumerate(p for g in self.groups for p in g)}
        kinds = world.bcast([{k: (torch.is_tensor(v) and v.dim() > 0, str(v.dtype).removeprefix("torch.")
                                  if torch.is_tensor(v) else "float64")
                              for k, v in opt.state.get(b.shard, {}).items()} for b in self.buckets]
                            if world.is_root else None)  # rank 0 owns a chunk of every bucket
        state: dict = {}
        for b, kind in zip(self.buckets, kinds):
            mine = opt.state.get(b.shard, {})
            for k, (tensor, dtype) in sorted(kind.items()):
                v = mine.get(k)
                if tensor:
                    chunk = v.detach().cpu().numpy() if torch.is_tensor(v) and v.dim() > 0 else None
                    for p, src, dst in b.pieces():
                        entry = state.setdefault(str(index[p]), {}).setdefault(
                            k, checkpoint.Pieces(tuple(p.shape), np.dtype(dtype), []))
                        entry.pieces.append((src.start, chunk[dst].copy()))
                    for p in b.params:  # (parameters outside this rank's chunk: no pieces here)
                        state.setdefault(str(index[p]), {}).setdefault(
                            k, checkpoint.Pieces(tuple(p.shape), np.dtype(dtype), []))
                else:  # per-parameter scalars (the step count): rank 0's are written
                    value = np.asarray(v.item() if torch.is_tensor(v) else (0.0 if v is None else v))
                    for p in b.params:
                        state.setdefault(str(index[p]), {})[k] = value
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in params]}
                  for g, params in zip(opt.param_groups, self.groups)]
        return {"state": state, "param_groups": json.dumps(groups)}

    # -- per step --------------------------------------------------------------------------
    def _reset(self):
        self._left = [len(b.params) for b in self.buckets]
        self._launched = [False] * len(self.buckets)
        self._next = 0
        self._deferred: list[int] = []  # launched before the step's number was known (compressors)

    def _in_flight(self) -> bool:
        """Some bucket of this step is launched or complete but not finished (the same on
        every rank: the hooks fire alike)."""
        return any(self._launched) or any(left < len(b.params) for left, b in zip(self._left, self.buckets))

    def _grad_ready(self, p):
        if self.paused:
            return
        b, i = self.bucket_of[p]
        bk = self.buckets[b]
        if bk.views and p.grad is not bk.views[i]:  # replaced (zero_grad(set_to_none=True)): back into the bucket
            bk.views[i].copy_(p.grad)
            p.grad = bk.views[i]
        self._left[b] -= 1
        if self._left[b] == 0:
            while self._next < len(self.buckets) and self._left[self._next] == 0:
                self._launch(self._next)
                self._next += 1

    def _send_buffer(self, bk: _Bucket) -> torch.Tensor:
        """The bucket's full local gradient: stage 1 its buffer; stage 2 a new one, the
        parameters' .grad released."""
        if bk.grad is not None:
            return bk.grad
        flat = torch.zeros_like(bk.flat)
        for p, o in zip(bk.params, bk.offsets):
            if p.grad is not None:
                flat[o:o + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None
        return flat

    def _launch(self, b: int):
        bk = self.buckets[b]
        if self.compressors and self._step is None:  # the first step: its number (reduce_'s) is known in _finish
            self._launched[b] = True
            self._deferred.append(b)
            return
        if self._thread is None:  # blocking, now: stage 2 releases the bucket's gradients at once
            self._launched[b] = True
            self._reduce(b, self._send_buffer(bk))
            return
        if self.options.stage == 2 and b >= 2:  # at most two stage-2 buckets in flight
            self._wait(b - 2)
        send = self._send_buffer(bk)
        event = None
        if send.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(send.device))
        self._done[b].clear()
        self._launched[b] = True
        self._work.put((b, send, event))

    def _wait(self, b: int):
        self._done[b].wait()
        if self._errors:
            raise self._errors[0]

    def _reduce(self, b: int, send: torch.Tensor) -> None:
        """Blocking: bucket b's reduction, by its compressor or by the reduce-scatter."""
        if self.compressors:
            self._compressed(b)
        else:
            self._reduce_scatter(self.buckets[b], send)

    def _compressed(self, b: int) -> None:
        """Blocking, stage 1: the bucket's compressor turns its whole gradient buffer into
        the sum over ranks in place (seeing it unscaled: divided by the fp16 loss scale and
        multiplied back, a power of two, so exact), then this rank's chunk of it becomes
        the shard's gradient."""
        bk = self.buckets[b]
        scale = self._scale
        if scale is not None:
            bk.grad.div_(scale)
        self.compressors[b].reduce_(bk.grad, self._step)
        if scale is not None:
            bk.grad.mul_(scale)
        if bk.shard.grad is None:  # the user's zero_grad(set_to_none=True)
            bk.shard.grad = torch.zeros_like(bk.shard)
        bk.shard.grad.copy_(bk.grad[bk.lo:bk.hi])

    def _reduce_scatter(self, bk: _Bucket, send: torch.Tensor) -> None:
        """Blocking: rank r's chunk of the bucket's gradient summed over ranks, into its
        shard's .grad (through host memory for CUDA tensors)."""
        host = send.cpu() if send.is_cuda else send
        if bk.shard.grad is None:  # the user's zero_grad(set_to_none=True)
            bk.shard.grad = torch.zeros_like(bk.shard)
        out = bk.shard.grad
        recv = torch.empty(bk.hi - bk.lo, dtype=host.dtype) if out.is_cuda else out
        dtype = HALF.get(self.options.payload)
        if dtype is not None:  # 2-byte values to each chunk's owner, summed there in float32
            mine, scale = half_reduce_scatter(self._world, host, dtype)
            recv.copy_(mine[:bk.hi - bk.lo] / scale)
        else:
            buffers.reduce_scatter_(self.comm, host, recv, bk.counts)
        if recv is not out:
            out.copy_(recv)

    def _comm_loop(self):
        while True:
            item = self._work.get()
            if item is None:
                return
            b, send, event = item
            try:
                if event is not None:
                    torch.cuda.set_device(send.device)
                    event.synchronize()
                self._reduce(b, send)
            except BaseException as e:  # hand the failure to the training thread
                self._errors.append(e)
            finally:
                self._done[b].set()

    def _finish(self, step: int):
        """Complete every bucket's reduction (launching those whose hooks did not fire:
        unused parameters, and those deferred until the first step's number was known);
        zero the stage-1 gradient buffers for the next step, whose number is step + 1."""
        if self._step is None:
            self._step = step
        deferred, self._deferred = self._deferred, []
        for b in deferred:  # (launched in order, before any later bucket)
            self._launched[b] = False
            self._launch(b)
        for b in range(len(self.buckets)):
            if not self._launched[b]:
                self._left[b] = 0
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for b, bk in enumerate(self.buckets):
            if self._thread is not None:
                self._wait(b)
            if bk.grad is not None:
                bk.grad.zero_()
        self._reset()
        self._step = step + 1

    def after_backward(self, step):
        self._finish(step)

    def skip_step(self, step):
        """A skipped step: complete the reductions backward started (none are left after an
        fp16 overflow: after_backward finished them), apply nothing."""
        if self._in_flight():
            self._finish(step)

    def grad_sq_norm(self) -> float:
        """Collective: the squared 2-norm of the whole reduced gradient (every rank's chunks;
        inf or NaN where any rank's is not finite), in one scalar allreduce."""
        local = sum(float(torch.linalg.vector_norm(b.shard.grad, dtype=torch.float64) ** 2)
                    for b in self.buckets if b.shard.grad is not None and b.shard.numel())
        return float(self.world.sum(np.array([local]))[0])

    def after_step(self, step):
        """Every bucket's parameters from their owners (in place)."""
        for bk in self.buckets:
            if bk.offload:  # this rank's updated chunk, from host memory
                bk.flat[bk.lo:bk.hi].copy_(bk.shard.detach())
            host = bk.flat.cpu() if bk.flat.is_cuda else bk.flat
            buffers.allgatherv_(self.comm, host, bk.counts, bk.displs)
            if host is not bk.flat:
                bk.flat.copy_(host)

    def consolidated(self):
        return contextlib.nullcontext()  # the parameters are whole and equal on every rank

    @contextlib.contextmanager
    def no_sync(self):
        """Backward accumulates into the gradients without reducing (gradient accumulation)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def close(self):
        for h in getattr(self, "_hooks", []):
            h.remove()
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None
        self.comm.Free()


class CompressedZero(CompressedState, ZeroStrategy):
    """zero with [sync.zero.compress] (stage 1; ZeroStrategy.__new__ picks it): each bucket's
    compressor reduces its whole gradient buffer, and the strategy keeps the compressors'
    state as allreduce does — checkpointed ({"compress": {"<bucket>": arrays}}, Stateful /
    RankStateful), committed after a counted step, rolled back bit for bit on a skipped
    one, and in the gradient's own units under fp16 loss scaling (Scaled)."""

    def setup(self, model, optimizer, resources):
        super().setup(model, optimizer, resources)
        spec = self.options.compress
        cls = compress.REGISTRY[spec.kind]
        self.compressors = [cls(spec.options, bk.grad, [(o, p.shape) for p, o in zip(bk.params, bk.offsets)],
                                self._world) for bk in self.buckets]
        self._commit()  # a skipped step's fallback

    def skip_step(self, step):
        """Complete what backward started, then every compressor's state as before the step."""
        super().skip_step(step)
        self._rollback()

    def after_step(self, step):
        super().after_step(step)
        self._commit()

    def loss_scale(self, scale):
        """The fp16 loss scale of the coming backward's gradients: the compressors see them
        divided by it (their residuals stay in the gradient's units)."""
        self._scale = scale
