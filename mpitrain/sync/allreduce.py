"""Synchronous data parallelism: bucketed gradient allreduce overlapped with backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..comm.collectives import GradBuckets, resolve_overlap
from ..options import opt
from .base import register


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


@register("allreduce")
class AllreduceStrategy:
    """Every step: mean of the gradients over all ranks, then the same optimizer step
    everywhere. Optimizer state stays local and identical on all ranks. The loss is
    pre-scaled by 1/global batch, so the SUM the buckets compute is already the mean."""

    Options = Options
    sums_gradients = True

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log
        self.buckets: GradBuckets | None = None

    def setup(self, model, optimizer, resources):
        o = self.options
        self.world.broadcast_module(model)
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
        self.buckets.finish()

    def after_step(self, step):
        pass

    def consolidated(self):
        return contextlib.nullcontext()  # the replicas never differ

    @contextlib.contextmanager
    def no_sync(self):
        """Backward accumulates into the buckets without reducing (gradient accumulation)."""
        self.buckets.paused = True
        yield
        self.buckets.paused = False
