"""Synchronous data parallelism: bucketed gradient allreduce overlapped with backward,
optionally compressed per bucket (sync/compress: the compressor runs where the bucket's
allreduce would, on the communication thread)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .. import trace
from ..comm.collectives import GradBuckets, resolve_overlap
from ..errors import UserError
from ..options import opt
from . import compress
from .base import register
from .compress.base import CompressedState


@dataclass(frozen=True)
class Options:
    bucket_mb: float = opt(25.0, gt=0.0, help="gradient bucket size")
    first_bucket_mb: float = opt(1.0, gt=0.0, help="smaller first bucket starts communication early")
    overlap: str = opt("auto", choices=("auto", "thread", "nonblocking", "none"),
                       help="thread: blocking Allreduce per bucket on a comm thread; auto: thread when "
                            "each rank has >= 2 cores or a GPU, else none (see README benchmarks); "
                            "with compression, nonblocking becomes thread")
    cuda_path: str = opt("auto", choices=("auto", "direct", "staged"),
                         help="CUDA tensors: device buffers to a CUDA-aware MPI, or pinned-host staging")
    hierarchical: bool | str = opt("auto", choices=(True, False, "auto"),
                                   help="sum inside each node, then over one leader per node, then broadcast "
                                        "in the node; auto: across nodes, where measured faster (uncompressed "
                                        "buckets only)")
    compress: compress.Compress = opt(compress.Compress(),
                                      help="[sync.allreduce.compress]: kind and that compressor's keys")


@register("allreduce")
class AllreduceStrategy(CompressedState):
    """Every step: mean of the gradients over all ranks, then the same optimizer step
    everywhere. Optimizer state stays local and identical on all ranks. The loss is
    pre-scaled by 1/global batch, so the SUM the buckets compute is already the mean.

    Checkpoint state (Stateful / RankStateful, from compress.base.CompressedState): the
    compressors' per bucket, {"compress": {"<bucket>": {...}}} — the arrays equal on every
    rank (PowerSGD's Q) in `state_dict`, this rank's own (error-feedback residuals) in
    `rank_state_dict`; {} where there are none (no compression, fp16/bf16)."""

    Options = Options
    sums_gradients = True
    replicas_differ = False  # the same parameters and optimizer state on every rank

    def __init__(self, options: Options, world, log=None):
        self.options, self.world, self.log = options, world, log
        self.buckets: GradBuckets | None = None
        if options.compress.kind != "none" and options.hierarchical is True:
            raise UserError(f"sync.allreduce.hierarchical = true does not combine with compress.kind = "
                            f"{options.compress.kind!r} (a compressor sends its own collectives): set "
                            "hierarchical = false or 'auto'")

    def setup(self, model, optimizer, resources):
        o = self.options
        self.world.broadcast_module(model)
        on_gpu = next(model.parameters()).is_cuda
        overlap = resolve_overlap(o.overlap, self.world.cores_per_rank(), on_gpu, self.world.thread_multiple)
        # without overlap every bucket is reduced after backward: a small first bucket would
        # only add a round of latency (a compressor's collectives twice over)
        first_mb = o.first_bucket_mb if overlap != "none" else max(o.first_bucket_mb, o.bucket_mb)
        self.buckets = GradBuckets(model.parameters(), self.world, bucket_bytes=int(o.bucket_mb * 2**20),
                                   first_bucket_bytes=int(first_mb * 2**20), overlap=overlap,
                                   average=False, cuda_path=o.cuda_path, hierarchical=o.hierarchical,
                                   reducer=self._compressor(), timeline=trace.current, log=self.log)
        resources.callback(self.buckets.close)
        self._commit()  # a skipped step's fallback
        if self.log and self.world.is_root:
            sizes = ", ".join(f"{b.numel() * b.element_size() / 2**20:.1f}" for b in self.buckets.buffers)
            h = self.buckets.hierarchy
            n = len(self.buckets.buffers)
            self.log.info(f"allreduce: {n} bucket{'s' if n != 1 else ''} ({sizes} MB), overlap {self.buckets.overlap}"
                          + (f", CUDA {'direct' if self.buckets.direct else 'staged'}" if on_gpu else "")
                          + (f", hierarchical over {h.nodes} node(s)" if h is not None else "")
                          + (f", compress {o.compress.kind} per bucket" if o.compress.kind != "none" else ""))

    def _compressor(self):
        """The per-bucket reducer GradBuckets makes: the selected compressor, or None."""
        spec = self.options.compress
        if spec.kind == "none":
            return None
        cls = compress.REGISTRY[spec.kind]
        return lambda buf, layout, world: cls(spec.options, buf, layout, world)

    @property
    def compressors(self) -> list:
        """The compressor of each bucket ([] without compression)."""
        return (self.buckets.reducers or []) if self.buckets is not None else []

    def wire(self) -> compress.Wire:
        """What a compressed step sends, as the compressors declare it (bucket by bucket);
        [] without compression."""
        spec, out = self.options.compress, []
        for buf, ps in zip(self.buckets.buffers, self.buckets.buckets) if self.compressors else ():
            matrices = [(p.shape[0], p.numel() // p.shape[0]) for p in ps if p.ndim >= 2]
            out += compress.REGISTRY[spec.kind].wire(buf.numel(), matrices, self.world.size, spec.options)
        return out

    def after_backward(self, step):
        self.buckets.finish(step)

    def skip_step(self, step):
        """A skipped step (a non-finite loss, or an fp16 overflow found after the reduction):
        complete the reductions backward launched (every rank agreed to skip, so every rank
        finishes), then put every compressor's state back as it was before the step, bit
        for bit (residuals, PowerSGD's Q)."""
        if self.buckets.pending:  # (after an fp16 overflow the reductions are complete already)
            self.buckets.finish(step)
        self._rollback()

    def loss_scale(self, scale):
        """The fp16 loss scale of the coming backward's gradients: the compressors see them
        divided by it (their residuals stay in the gradient's units)."""
        self.buckets.loss_scale = scale

    def after_step(self, step):
        self._commit()

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
