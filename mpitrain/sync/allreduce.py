"""Synchronous data parallelism: bucketed gradient allreduce overlapped with backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..comm.collectives import GradBuckets, resolve_overlap
from ..options import opt
from . import compress
from .base import register
from .helpers import FlatParams


@dataclass(frozen=True)
class Options:
    bucket_mb: float = opt(25.0, gt=0.0, help="gradient bucket size")
    first_bucket_mb: float = opt(1.0, gt=0.0, help="smaller first bucket starts communication early")
    overlap: str = opt("auto", choices=("auto", "thread", "nonblocking", "none"),
                       help="thread: blocking Allreduce per bucket on a comm thread; auto: thread when "
                            "each rank has >= 2 cores or a GPU, else none (see README benchmarks)")
    cuda_path: str = opt("auto", choices=("auto", "direct", "staged"),
                         help="CUDA tensors: device buffers to a CUDA-aware MPI, or pinned-host staging")
    hierarchical: bool | str = opt("auto", choices=(True, False, "auto"),
                                   help="sum inside each node, then over one leader per node, then broadcast "
                                        "in the node; auto: across nodes, where measured faster")
    compress: str = opt("none", choices=("none", "fp16", "bf16", "topk", "powersgd", "sign"),
                        help="gradient compression (reduced after backward, no bucket overlap); see README")
    topk_ratio: float = opt(0.01, gt=0.0, max=1.0, help="topk: fraction of the values sent")
    powersgd_rank: int = opt(2, min=1, max=4096, help="powersgd: rank of the approximation")
    powersgd_start_step: int = opt(0, min=0, help="powersgd: plain allreduce for this many steps first")
    powersgd_min_numel: int = opt(4096, min=0, help="powersgd: smaller tensors and vectors go uncompressed")


@register("allreduce")
class AllreduceStrategy:
    """Every step: mean of the gradients over all ranks, then the same optimizer step
    everywhere. Optimizer state stays local and identical on all ranks. The loss is
    pre-scaled by 1/global batch, so the SUM the buckets compute is already the mean."""

    Options = Options
    sums_gradients = True
    replicas_differ = False

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log
        self.buckets: GradBuckets | None = None
        self.compressor = None

    def setup(self, model, optimizer, resources):
        o = self.options
        self.world.broadcast_module(model)
        if o.compress != "none":
            self.flat = FlatParams(model)
            self.compressor = compress.create(o, self.world, self.flat.params, self.flat.grad)
            if self.log and self.world.is_root:
                self.log.info(f"allreduce: compress {o.compress}, one reduction after backward")
            return
        on_gpu = next(model.parameters()).is_cuda
        overlap = resolve_overlap(o.overlap, self.world.cores_per_rank(), on_gpu, self.world.thread_multiple)
        self.buckets = GradBuckets(model.parameters(), self.world, bucket_bytes=int(o.bucket_mb * 2**20),
                                   first_bucket_bytes=int(o.first_bucket_mb * 2**20), overlap=overlap,
                                   average=False, cuda_path=o.cuda_path, hierarchical=o.hierarchical,
                                   log=self.log)
        resources.callback(self.buckets.close)
        if self.log and self.world.is_root:
            sizes = ", ".join(f"{b.numel() * b.element_size() / 2**20:.1f}" for b in self.buckets.buffers)
            h = self.buckets.hierarchy
            self.log.info(f"allreduce: {len(self.buckets.buffers)} buckets ({sizes} MB), overlap {self.buckets.overlap}"
                          + (f", CUDA {'direct' if self.buckets.direct else 'staged'}" if on_gpu else "")
                          + (f", hierarchical over {h.nodes} node(s)" if h is not None else ""))

    def after_backward(self, step):
        if self.compressor is not None:
            self.compressor.reduce_(self.flat.gather_grads(), step)
        else:
            self.buckets.finish()

    def after_step(self, step):
        pass

    def rank_state_dict(self):
        """A compressor's state: (this rank's error feedback, PowerSGD's Q), keys prefixed
        with the compressor's name; ({}, {}) without compression or for fp16/bf16."""
        if self.compressor is None:
            return {}, {}
        own, shared = self.compressor.state()
        prefix = f"{self.options.compress}."
        return compress.state_arrays(own, prefix), compress.state_arrays(shared, prefix)

    def load_rank_state_dict(self, own, shared):
        """The compressor's state from a checkpoint; what it lacks (an older checkpoint, or
        other compress options) starts afresh, with one line on rank 0."""
        if self.compressor is None:
            return
        mine, common = self.compressor.state()
        prefix, fresh = f"{self.options.compress}.", []
        if own is not None and not compress.load_state(mine, own, prefix):
            fresh.append("error feedback starts at zero")
        if not compress.load_state(common, shared, prefix):
            fresh.append("Q starts afresh")
        if fresh and self.log and self.world.is_root:
            self.log.info(f"allreduce: the checkpoint holds no {self.options.compress} state (written before it "
                          f"was saved, or with other compress options): {', '.join(fresh)}")

    def consolidated(self):
        return contextlib.nullcontext()  # the replicas never differ

    @contextlib.contextmanager
    def no_sync(self):
        """Backward accumulates into the buckets without reducing (gradient accumulation)."""
        if self.buckets is not None:
            self.buckets.paused = True
        yield
        if self.buckets is not None:
            self.buckets.paused = False
