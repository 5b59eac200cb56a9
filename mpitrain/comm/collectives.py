"""Bucketed gradient allreduce that overlaps communication with the backward pass.

Gradients live in flat bucket buffers: each parameter's `.grad` is a view into its
bucket, so nothing is copied before the reduction. Buckets hold parameters in reverse
order (the order backward produces them), the first one small so communication starts
early. A post-accumulate-grad hook counts ready parameters; when a bucket is complete it
is launched. Buckets are always launched in index order, so every rank issues the same
collectives in the same order even if hooks fire in a different order.

Overlap modes (chosen by `mpitrain bench step`, see README; `resolve_overlap` is the one
place that turns "auto" into a mode):
- "thread": a communication thread runs a blocking Allreduce per bucket on its own
  communicator (mpi4py releases the GIL in MPI calls) and, for CUDA buckets, its own
  stream: it waits for each bucket's event, never for the training thread's stream. Measured fastest: Open MPI makes
  no background progress on Iallreduce while Python computes.
- "nonblocking": Iallreduce per bucket from the hook, Waitall at the end.
- "none": all buckets reduced after backward (the naive baseline, same arithmetic).

A `reducer` replaces the SUM allreduce of each bucket by an object of the caller's (e.g.
a gradient compressor, made once per bucket): its `reduce_(buf, step)` runs where the
allreduce would (the communication thread, or at `finish` for "none"; "nonblocking" has
no place to run it and becomes "thread", or "none" without MPI_THREAD_MULTIPLE), on a
World over the buckets' private communicator. comm/ knows nothing of what it does.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import torch
from mpi4py import MPI

from . import buffers


def resolve_overlap(overlap: str, cores_per_rank: int, on_gpu: bool, thread_multiple: bool = True) -> str:
    """The overlap mode: "auto" is a comm thread where it pays — a core of its own, or
    compute on a GPU (measured in `mpitrain bench step`). Without MPI_THREAD_MULTIPLE a comm
    thread is not allowed; CPU tensors then use Iallreduce from the hook, CUDA tensors
    reduce after backward (their hooks run on autograd's device thread, where MPI calls are
    not allowed below THREAD_MULTIPLE, and staging there would stall backward)."""
    if overlap == "auto":
        overlap = "thread" if cores_per_rank >= 2 or on_gpu else "none"
    if not thread_multiple and overlap != "none":
        return "none" if on_gpu else "nonblocking"
    return overlap


class NodeHierarchy:
    """Collective to create and to `free`: the ranks of each node (shared memory) and one
    leader per node. `allreduce_(buf)` sums inside each node onto its leader, over the
    leaders (the only traffic between nodes: one buffer per node instead of one per
    rank), then broadcasts inside each node. Nodes may differ in size. `color` groups the
    ranks into nodes explicitly (tests); by default they are the shared-memory domains."""

    def __init__(self, comm: MPI.Intracomm, color: int | None = None):
        rank = comm.Get_rank()
        self.node = (comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank) if color is None
                     else comm.Split(color, rank))
        self.leader = self.node.Get_rank() == 0
        self.leaders = comm.Split(0 if self.leader else MPI.UNDEFINED, rank)
        self.nodes = comm.allreduce(int(self.leader))

    def allreduce_(self, buf) -> None:
        """Collective: in-place sum over all ranks of an MPI buffer spec [array, datatype]."""
        if self.leader:
            self.node.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
            self.leaders.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        else:
            self.node.Reduce(buf, None, op=MPI.SUM, root=0)
        self.node.Bcast(buf, root=0)

    def free(self) -> None:
        """Collective."""
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
        self.node.Free()


class _NoTimeline:
    def now(self) -> int:
        return 0

    def add(self, *args, **kwargs) -> None:
        pass


def _no_timeline() -> _NoTimeline:
    return _NO_TIMELINE


_NO_TIMELINE = _NoTimeline()


class GradBuckets:
    """Gradients of `params` in flat bucket buffers, summed (or averaged) over the world's
    ranks as they become ready. Collective to create and to `close`.

    `reducer(buf, layout, world)`, if given, is called once per bucket (its flat buffer,
    the (offset, shape) of each parameter in it, a World on the buckets' communicator) and
    returns the object whose `reduce_(buf, step)` turns the bucket into the sum over ranks
    in place, instead of an allreduce (no hierarchy, no staging: it does its own transfers).
    The reducer sees the bucket divided by `loss_scale` (a 0-dim tensor, e.g. the fp16 loss
    scale of the coming backward; None: as it is) and its result is multiplied back.
    `step` is the number passed to the last `finish` + 1; before the first `finish(step)`
    it is unknown, so that step's reductions wait for `finish` (no overlap once).
    `timeline()`, if given, returns where each bucket's reduction is recorded (an object
    with `now()` and `add(name, begin, end, track, **args)`, e.g. mpitrain.trace.current)."""

    def __init__(self, params, world, *, bucket_bytes: int, first_bucket_bytes: int,
                 overlap: str = "thread", average: bool = True, cuda_path: str = "auto",
                 hierarchical: bool | str = False, reducer=None, timeline=None, log=None):
        self.comm = world.comm.Dup()
        self.timeline = timeline or _no_timeline
        self.size = self.comm.Get_size()
        # average=False: the caller pre-scaled the loss, the SUM is already the mean (saves a pass)
        self.scale = 1.0 / self.size if average and self.size > 1 else None
        self.overlap = overlap
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = []
        cur, cur_bytes, limit = [], 0, first_bucket_bytes
        for p in reversed(self.params):
            nb = p.numel() * p.element_size()
            if cur and (cur_bytes + nb > limit or p.dtype != cur[0].dtype or p.device != cur[0].device):
                self.buckets.append(cur)
                cur, cur_bytes, limit = [], 0, bucket_bytes
            cur.append(p)
            cur_bytes += nb
        if cur:
            self.buckets.append(cur)
        self.buffers: list[torch.Tensor] = []
        self.views: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.bucket_of: dict[torch.nn.Parameter, int] = {}
        self.layouts: list[list[tuple[int, torch.Size]]] = []  # per bucket: (offset, shape) of each parameter
        for b, ps in enumerate(self.buckets):
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            off = 0
            self.layouts.append([])
            for p in ps:
                self.layouts[b].append((off, p.shape))
                view = flat[off:off + p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                self.views[p] = view
                self.bucket_of[p] = b
                off += p.numel()
            self.buffers.append(flat)
        self.nbytes = sum(f.numel() * f.element_size() for f in self.buffers)
        self.is_cuda = bool(self.buffers) and self.buffers[0].is_cuda
        self.overlap = resolve_overlap(overlap, 1, self.is_cuda, world.thread_multiple)
        if reducer is not None and self.overlap == "nonblocking":  # no Iallreduce to hand it to
            self.overlap = "thread" if world.thread_multiple else "none"
            if log and world.is_root:
                log.info(f"overlap 'nonblocking' has no nonblocking form of a bucket reducer: '{self.overlap}'")
        self.direct = self.is_cuda and self._choose_direct(cuda_path, world, log)
        # host mirrors: CUDA buckets on the staged path or with Iallreduce (never on device
        # buffers: nothing would order it with the GPU streams), and fp16/bf16 (summed in float32)
        staged = not self.direct or self.overlap == "nonblocking"
        self.stagers = [buffers.Stager(f) if reducer is None and ((f.is_cuda and staged)
                                                                  or f.dtype in buffers.VIA_FLOAT32)
                        else None for f in self.buffers]
        self.hierarchy = (self._choose_hierarchy(hierarchical, world, log) if self.buffers and reducer is None
                          else None)
        self.step: int | None = None  # the step of the next reduction (for the reducer)
        self.loss_scale: torch.Tensor | None = None  # divided out of what a reducer sees
        self.reducers = None
        if reducer is not None:
            # the buckets' own communicator (the comm thread's), and the path chosen above
            bucket_world = dataclasses.replace(world, comm=self.comm, direct_cuda=world.direct_cuda)
            self.reducers = [reducer(f, lay, bucket_world) for f, lay in zip(self.buffers, self.layouts)]
        if self.hierarchy is not None and self.overlap == "nonblocking":
            self.overlap = "none"  # three dependent collectives: no single nonblocking call
        self.paused = False
        self._hooks = [p.register_post_accumulate_grad_hook(self.grad_ready) for p in self.params]
        self._reset()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        if self.overlap == "thread" and self.buckets:
            self._thread = threading.Thread(target=self._comm_loop, name="mpitrain-comm", daemon=True)
            self._thread.start()

    # -- per step ------------------------------------------------------------------
    def _reset(self):
        self._left = [len(ps) for ps in self.buckets]
        self._ready = [False] * len(self.buckets)
        self._next = 0  # next bucket index to launch
        self._events = [None] * len(self.buckets)
        self._launched = [0] * len(self.buckets)  # trace: when each bucket was launched
        self._reqs: list[MPI.Request] = []
        self._deferred: list[int] = []  # launched before the step was known (reducers)

    @property
    def pending(self) -> bool:
        """Some bucket of this step is launched or ready but not finished."""
        return any(self._ready) or bool(self._deferred)

    def zero_(self):
        for f in self.buffers:
            f.zero_()

    def grad_ready(self, p):
        """The post-accumulate-grad hook: p's gradient for this step is complete."""
        view = self.views[p]
        if p.grad is not view:  # someone replaced .grad (e.g. zero_grad(set_to_none=True))
            view.copy_(p.grad)
            p.grad = view
        if self.paused:  # accumulating micro-batches: reduce after the last one only
            return
        b = self.bucket_of[p]
        self._left[b] -= 1
        if self._left[b] == 0:
            self._mark_ready(b)

    def _mark_ready(self, b: int):
        if self.is_cuda:  # the bucket is complete once the kernels queued so far have run
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.buffers[b].device))
            self._events[b] = ev
        self._ready[b] = True
        while self._next < len(self.buckets) and self._ready[self._next]:
            self._launch(self._next)
            self._next += 1

    def _launch(self, b: int):
        self._launched[b] = self.timeline().now()
        if self.reducers is not None:  # it counts its own traffic
            if self.step is None:
                self._deferred.append(b)
                return
        else:
            buffers.TRAFFIC.add(self.buffers[b].numel() * self.buffers[b].element_size())
        if self.overlap == "thread":
            self._work.put(b)
        elif self.overlap == "nonblocking":  # through host mirrors for CUDA and half types
            st = self.stagers[b]
            host = st.to_host(self.buffers[b], self._events[b]) if st is not None else self.buffers[b]
            self._reqs.extend(buffers.iallreduce_(self.comm, host))

    def _reduce_blocking(self, b: int):
        flat = self.buffers[b]
        if self.reducers is not None:
            if self._events[b] is not None:  # this thread's stream starts after the bucket is complete
                torch.cuda.current_stream(flat.device).wait_event(self._events[b])
            scale = self.loss_scale
            if scale is not None:  # a power of two: exact both ways
                flat.div_(scale)
            self.reducers[b].reduce_(flat, self.step)
            if scale is not None:
                flat.mul_(scale)
        else:
            buffers.allreduce_(self.comm, flat, direct=self.direct, stager=self.stagers[b], ready=self._events[b],
                               count=False, via=self.hierarchy)
        if self.scale is not None:
            flat.mul_(self.scale)
        self._traced(b)
        if self.is_cuda:  # the training thread's stream waits for this before using the gradients
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flat.device))
            self._events[b] = done

    def _traced(self, b: int) -> None:
        """Trace bucket b's reduction, from its launch to now."""
        t = self.timeline()
        t.add("bucket", self._launched[b], t.now(), "comm" if self.overlap == "thread" else "main",
              bucket=b, bytes=self.buffers[b].numel() * self.buffers[b].element_size())

    def _comm_loop(self):
        if self.is_cuda:  # Open MPI wants the device selected before CUDA-using calls (ompi#627)
            torch.cuda.set_device(self.buffers[0].device)
            # this thread's kernels and waits go on a stream of its own: the default stream
            # holds the training thread's backward, which the reductions must not wait for
            self._comm_stream = torch.cuda.Stream(self.buffers[0].device)
            torch.cuda.set_stream(self._comm_stream)
        while True:
            b = self._work.get()
            if b is None:
                return
            try:
                self._reduce_blocking(b)
                self._done.put(None)
            except BaseException as e:  # hand the failure to the training thread
                self._done.put(e)

    def finish(self, step: int | None = None):
        """Collective: launch any bucket whose hooks did not fire (unused parameters),
        wait for all reductions; afterwards every .grad holds the sum over ranks, times
        1/size if `average`. `step`: this step's number, for the reducers (the next
        step's is assumed to be step + 1)."""
        for b in range(len(self.buckets)):
            if not self._ready[b]:
                self._mark_ready(b)
        if self._deferred:  # the first step: its number is known only now
            self.step = step if step is not None else 0
            deferred, self._deferred = self._deferred, []
            if self.overlap == "thread":
                for b in deferred:
                    self._work.put(b)
        if self.overlap == "thread":
            for _ in self.buckets:
                err = self._done.get()
                if err is not None:
                    raise err
            if self.is_cuda:
                stream = torch.cuda.current_stream(self.buffers[0].device)
                for ev in self._events:
                    stream.wait_event(ev)
        elif self.overlap == "nonblocking":
            MPI.Request.Waitall(self._reqs)
            for b, flat in enumerate(self.buffers):
                if self.stagers[b] is not None:
                    self.stagers[b].to_device(flat)
                if self.scale is not None:
                    flat.mul_(self.scale)
                self._traced(b)
        else:
            for b in range(len(self.buckets)):
                self._reduce_blocking(b)
        if step is not None:
            self.step = step + 1
        elif self.step is not None:
            self.step += 1
        self._reset()

    def close(self):
        for h in self._hooks:
            h.remove()
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None
        if self.hierarchy is not None:
            self.hierarchy.free()
        self.comm.Free()

    # -- path choices (collective, the same on every rank) -----------------------------
    def _choose_hierarchy(self, hierarchical, world, log) -> NodeHierarchy | None:
        """Collective: a NodeHierarchy to reduce through, or None for the flat allreduce.
        "auto": only across nodes, and only if it is clearly (10 %) faster on the largest
        bucket: timing noise should not flip the choice between runs (the two sum in different
        orders; set true/false where a rerun must round exactly alike)."""
        if hierarchical is False:
            return None
        h = NodeHierarchy(self.comm)
        if hierarchical == "auto":
            if h.nodes == 1 or h.nodes == self.size:  # one node, or one rank per node: nothing to gain
                h.free()
                return None
            probe = max(self.buffers, key=torch.Tensor.numel).clone()
            times = {name: self._time(lambda via=via: buffers.allreduce_(self.comm, probe, direct=self.direct,
                                                                        count=False, via=via))
                     for name, via in (("flat", None), ("hierarchical", h))}
            if log and world.is_root:
                log.info(f"hierarchical auto ({h.nodes} nodes): flat {times['flat'] * 1e3:.2f} ms, "
                         f"hierarchical {times['hierarchical'] * 1e3:.2f} ms per "
                         f"{probe.numel() * probe.element_size() / 1e6:.1f} MB")
            if times["hierarchical"] >= 0.9 * times["flat"]:
                h.free()
                return None
        return h

    def _time(self, fn, repeats: int = 3) -> float:
        """Collective: seconds per call of fn (after one warm-up), the slowest rank's."""
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return self.comm.allreduce((time.perf_counter() - t0) / repeats, op=MPI.MAX)

    def _choose_direct(self, cuda_path: str, world, log) -> bool:
        """Collective: device buffers or pinned-host staging, the same on every rank, and
        from then on the path of every transfer of the job (world.direct_cuda): direct only
        if the job agreed its MPI is CUDA-aware; "auto" times both on the largest bucket."""
        if not world.direct_cuda:
            if cuda_path == "direct" and log and world.is_root:
                log.warning("sync.allreduce.cuda_path = 'direct' but MPI is not CUDA-aware on every rank "
                            "(MPITRAIN_CUDA_AWARE=1 to assert it): staging through host memory")
            return False
        if cuda_path == "auto":
            probe = max(self.buffers, key=torch.Tensor.numel).clone()
            stager = buffers.Stager(probe)
            times = {direct: self._time(lambda d=direct: buffers.allreduce_(self.comm, probe, direct=d,
                                                                           stager=stager, count=False))
                     for direct in (True, False)}
            if log and world.is_root:
                log.info(f"cuda_path auto: direct {times[True] * 1e3:.2f} ms, staged {times[False] * 1e3:.2f}"
                         f" ms per {probe.numel() * probe.element_size() / 1e6:.1f} MB")
            world.direct_cuda = times[True] < times[False]
        else:
            world.direct_cuda = cuda_path == "direct"
        return world.direct_cuda
