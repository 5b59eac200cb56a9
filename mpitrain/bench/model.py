"""`mpitrain bench model`: fit the cost model (bench/costmodel.py) on this machine and
transport, predict the step time of a job under each strategy and compressor, and measure
them in the same run.

Collective. (1) alpha and beta of the current transport from timed allreduces of several
sizes (the slowest rank's, median of rounds); (2) the job's compute time per step on this
rank with no communication, and each compressor's own arithmetic (with collectives that
only copy); (3) for each variant, the predicted step time (compute + codec + communication) next to the measured one (the job's own step, `train.build` with the
variant's overrides); (4) predictions for large models and world sizes from the fitted
latency and a given network bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from .. import config, train
from ..faults import collective_cleanup
from ..sync import compress
from . import costmodel
from .e2e import groups, mpitrain_step, single_step
from .timing import Variant, header, parse_size, time_rounds


def _variants() -> dict:
    """name: (overrides, cost-model strategy, options): dense allreduce, each registered
    compressor that names a bench variant (`Compressor.bench`: label and options), local SGD."""
    out = {"allreduce": (["sync.strategy=allreduce"], "allreduce", {})}
    for kind, cls in compress.REGISTRY.items():
        if cls.bench is not None:
            label, options = cls.bench
            sets = [f"sync.allreduce.compress.{k}={json.dumps(v)}" for k, v in options.items()]
            out[f"allreduce {label}"] = (["sync.strategy=allreduce", f"sync.allreduce.compress.kind={kind}", *sets],
                                         "allreduce", {})
    for stage in (1, 2):
        out[f"zero-{stage}"] = (["sync.strategy=zero", f"sync.zero.stage={stage}"], "zero", {})
    out["local_sgd H=4"] = (["sync.strategy=local_sgd", "sync.local_sgd.period=4"], "local_sgd", {"period": 4})
    return out


VARIANTS = _variants()


def run(args, world, log) -> None:
    cfg0 = world.agree(config.load, args.job, args.overrides)
    threads = train.configure_threads(0, world)
    header(world, "model", threads)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    fit_times = [_time_allreduce(world, b, args.iters) for b in sizes]
    latency = _time_allreduce(world, 8, args.iters * 10)
    transport = (costmodel.Transport.fit(sizes, fit_times, world.size, latency) if world.size > 1
                 else costmodel.Transport(0, 0))
    if world.is_root:
        print(f"# transport fit on {world.size} ranks: alpha {transport.alpha * 1e6:.1f} us, beta "
              f"{transport.beta * 1e9:.3f} ns/byte ({1 / transport.beta / 1e9 if transport.beta else float('inf'):.2f}"
              f" GB/s); fitted vs measured allreduce: " + ", ".join(
                  f"{b // 1024} KiB {transport.allreduce(b, world.size) * 1e3:.2f}/{t * 1e3:.2f} ms"
                  for b, t in zip(sizes, fit_times)))
    names = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    with collective_cleanup() as resources:
        extra = [f"output.dir=/tmp/mpitrain-bench-model-{world.bcast(time.time_ns())}", "train.progress=false",
                 "train.resume=never", "output.checkpoint_every=0"]
        jobs = {name: world.agree(train.build, world.agree(config.load, args.job,
                                                           [*args.overrides, *extra, *VARIANTS[name][0]]),
                                  world, log, resources) for name in names}
        base = next(iter(jobs.values()))
        local = copy.deepcopy(base.model)
        opt = torch.optim.SGD(local.parameters(), lr=1e-9)
        variants = [Variant("compute only", local,
                            single_step(local, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), base,
                                        base.train_split, None), kind="compute",
                            stream=_indices(groups(base.sampler, 1)), device=base.device)]
        for name, job in jobs.items():
            job.strategy.setup(job.model, job.optimizer, resources)
            variants.append(Variant(name, job.model, mpitrain_step(job), kind="mpitrain",
                                    stream=groups(job.sampler, job.cfg.train.accumulate), device=job.device))
        rounds = time_rounds(variants, argparse.Namespace(steps=args.steps, warmup=2, repeats=args.repeats),
                              world, set())
        ms = {v.label: statistics.median(x[0] for x in rounds[id(v)]) for v in variants}
        codec = {name: _codec_seconds(job, args.steps) for name, job in jobs.items()}
    model = costmodel.Model(sum(p.numel() for p in base.model.parameters()), costmodel.matrices_of(base.model))
    if world.is_root:
        compute = ms["compute only"] / 1e3
        print(f"# job {args.job}: {model.params:,} params, batch {cfg0.train.batch_size}/rank; compute only "
              f"{compute * 1e3:.2f} ms/step")
        print("| variant | predicted ms/step | of which codec | measured ms/step | predicted / measured |")
        print("|---|---|---|---|---|")
        for name in names:
            _, strategy, kw = VARIANTS[name]
            if getattr(jobs[name].strategy, "compressors", None):  # what its compressors declare, per bucket
                kw = kw | {"wire": jobs[name].strategy.wire()}
            pred = costmodel.step_seconds(strategy, model, transport, world.size, compute, codec=codec[name],
                                          **kw) * 1e3
            print(f"| {name} | {pred:.2f} | {codec[name] * 1e3:.2f} | {ms[name]:.2f} | {pred / ms[name]:.2f} |")
        _extrapolate(args, transport, compute, model)


class _Replicas:
    """A stand-in World of `size` ranks that all hold this rank's tensors: collectives
    return what MPI would deliver, with no communication, so a compressor's encode and
    decode (whose cost grows with the ranks it decodes) can be timed alone."""

    def __init__(self, size: int):
        self.size, self.rank, self.is_root = size, 0, True

    def max(self, x):
        return x

    def allreduce_(self, t):
        return t.mul_(self.size)

    def allgather_tensor(self, t):
        return t.unsqueeze(0).expand(self.size, *t.shape).clone()

    def alltoall_tensor(self, t):
        return t.clone()


def _codec_seconds(job, steps: int) -> float:
    """Seconds per step of this rank's compressor arithmetic alone (0 without compression):
    copies of the job's per-bucket compressors on _Replicas of the job's size reduce random
    gradients of the buckets' sizes; median of `steps`."""
    strategy = job.strategy
    if not getattr(strategy, "compressors", None):
        return 0.0
    spec, buckets = strategy.options.compress, strategy.buckets
    cls, replicas = compress.REGISTRY[spec.kind], _Replicas(job.world.size)
    codecs = [(cls(spec.options, buf, layout, replicas), torch.randn_like(buf))
              for buf, layout in zip(buckets.buffers, buckets.layouts)]
    times = []
    for _ in range(steps + 1):
        gs = [g.clone() for _, g in codecs]
        t0 = time.perf_counter()
        for (codec, _), g in zip(codecs, gs):
            codec.reduce_(g, step=10**9)  # past any start_step: the compressed path
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _indices(groups):
    """Groups of sampler batches as groups of index arrays (what single_step takes)."""
    for g in groups:
        yield [b.indices for b in g]


def _time_allreduce(world, nbytes: int, iters: int) -> float:
    """Collective: seconds per allreduce of nbytes, the slowest rank's, median of 3 rounds."""
    buf = torch.ones(max(1, nbytes // 4))
    world.allreduce_(buf)
    times = []
    for _ in range(3):
        world.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            world.allreduce_(buf)
        times.append(world.max((time.perf_counter() - t0) / iters))
    return statistics.median(times)


def _extrapolate(args, transport, compute, model) -> None:
    """Rank 0: a 100 M-parameter model (compute scaled by parameters from this job's)
    at larger world sizes and network bandwidths, latency as fitted."""
    big = costmodel.Model(args.big_params, tuple((4096, args.big_params // 4096 // 6) for _ in range(6)))
    big_compute = compute * big.params / model.params
    print(f"# predicted for a {big.params / 1e6:.0f} M-parameter model (compute {big_compute * 1e3:.0f} ms/step, "
          f"scaled by parameters from this job), alpha {max(transport.alpha, 5e-6) * 1e6:.1f} us:")
    print("| ranks | Gbit/s | allreduce ms/step | fp16 | powersgd r2 | local_sgd H=4 |")
    print("|---|---|---|---|---|---|")
    def wire(kind, n, **options):  # what the compressor declares for the model as one bucket
        cls = compress.REGISTRY[kind]
        return {"wire": cls.wire(big.params, big.matrices, n, cls.Options(**options))}

    for n in (64, 512):
        for gbit in (25, 100):
            t = costmodel.Transport(max(transport.alpha, 5e-6), 8 / (gbit * 1e9))
            row = [costmodel.step_seconds(s, big, t, n, big_compute, **kw) * 1e3
                   for s, kw in (("allreduce", {}), ("allreduce", wire("fp16", n)),
                                 ("allreduce", wire("powersgd", n, rank=2)), ("local_sgd", {"period": 4}))]
            print(f"| {n} | {gbit} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
