"""`mpitrain bench step|allreduce|straggler`: the communication layer and stragglers,
measured against baselines in the same run (timing.py: the slowest rank's time, variants
in interleaved rounds, the median round)."""

from __future__ import annotations

import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import buffers
from ..comm.collectives import GradBuckets, NodeHierarchy, resolve_overlap
from ..train import configure_threads
from .timing import Variant, header, init_gloo, parse_size, sync_device, time_rounds


def _mlp(features: int, hidden: list[int]) -> nn.Module:
    layers, w = [], features
    for h in hidden:
        layers += [nn.Linear(w, h), nn.ReLU()]
        w = h
    return nn.Sequential(*layers, nn.Linear(w, 10))


def step(args, world, log) -> None:
    """Collective: ms/step of compute-only, mpitrain sync (3 overlap modes), naive flat
    allreduce after backward, and torch DDP with gloo, same model and data."""
    threads = configure_threads(0, world)
    device = world.select_device(args.device)
    hidden = [int(h) for h in args.hidden.split(",")]
    torch.manual_seed(0)
    base = _mlp(args.features, hidden)
    g = torch.Generator().manual_seed(1 + world.rank)
    x = torch.randn(args.batch, args.features, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    header(world, "step", threads)

    def fresh():
        m = _mlp(args.features, hidden)
        m.load_state_dict(base.state_dict())
        m.to(device)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    variants = []

    # compute only: the bound for perfect overlap (same per-rank batch, same cores)
    m, opt = fresh()

    def local(m=m, opt=opt):
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    variants.append(Variant("compute only (no comm)", m, local))

    path = None  # the CUDA path: the first buckets choose it as training does (cuda_path auto), the rest take it
    for overlap in ("thread", "nonblocking", "none"):
        m, opt = fresh()
        world.broadcast_module(m)
        bk = GradBuckets(m.parameters(), world, bucket_bytes=int(args.bucket_mb * 2**20),
                         first_bucket_bytes=2**20, overlap=overlap, average=False, cuda_path=path or "auto",
                         log=log if path is None else None)
        if device.type == "cuda" and path is None:
            path = "direct" if bk.direct else "staged"

        def mp(m=m, opt=opt, bk=bk):  # as in training: the loss is pre-scaled, the SUM is the mean
            bk.zero_()
            (F.cross_entropy(m(x), y) / world.size).backward()
            bk.finish()
            opt.step()
        variants.append(Variant(f"mpitrain sync ({overlap})", m, mp, close=bk.close))

    m, opt = fresh()

    def naive(m=m, opt=opt):
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(m(x), y).backward()
        grads = [p.grad for p in m.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        world.average_(flat)
        off = 0
        for g_ in grads:
            g_.copy_(flat[off:off + g_.numel()].view_as(g_))
            off += g_.numel()
        opt.step()
    variants.append(Variant("naive flat allreduce", m, naive))

    if not args.no_ddp:
        init_gloo(world)
        m, _ = fresh()
        ddp = torch.nn.parallel.DistributedDataParallel(m, bucket_cap_mb=args.bucket_mb)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

        def ddp_step(ddp=ddp, opt=opt):
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        variants.append(Variant("torch DDP (gloo)", ddp, ddp_step))

    if world.is_root:  # after the probe: the path every variant takes
        print(f"# on {device} ({_cuda_path(path) + ', ' if device.type == 'cuda' else ''}"
              f"MLP {args.features}-{'-'.join(map(str, hidden))}-10: {n_params:,} params "
              f"({n_params * 4 / 2**20:.1f} MB of fp32 grads), batch {args.batch}/rank, "
              f"{args.steps} steps x {args.repeats} rounds, buckets {args.bucket_mb} MB)")
    timed = time_rounds(variants, args, world, set())
    rounds = {v.label: [ms for ms, _ in timed[id(v)]] for v in variants}
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    # every data-parallel variant must compute the same parameters (compute-only excepted)
    ref = torch.cat([p.detach().reshape(-1) for p in variants[1].model.parameters()])
    diff = {v.label: (torch.cat([p.detach().reshape(-1) for p in v.model.parameters()]) - ref).abs().max().item()
            for v in variants[2:]}
    for v in variants:
        v.close()
    if not args.no_ddp:
        torch.distributed.destroy_process_group()
    if world.is_root:
        bound = ms["compute only (no comm)"]
        ddp_ms = ms.get("torch DDP (gloo)")
        print(f"{'variant':28s} {'ms/step':>9s} {'min':>8s} {'max':>8s} {'/compute':>9s} {'/DDP':>7s}")
        for name, v in ms.items():
            print(f"{name:28s} {v:9.2f} {min(rounds[name]):8.2f} {max(rounds[name]):8.2f} "
                  f"{v / bound:9.2f} " + (f"{v / ddp_ms:7.2f}" if ddp_ms else "      -"))
        auto = resolve_overlap("auto", world.cores_per_rank(), device.type == "cuda", world.thread_multiple)
        print(f"# sync.overlap = 'auto' (the default) uses '{auto}' here: {world.cores_per_rank()} core(s) per rank")
        print("# max |param difference| to mpitrain sync (thread) after all steps: "
              + ", ".join(f"{k}: {d:.1e}" for k, d in diff.items()))


def allreduce(args, world, log) -> None:
    """Collective: algbw and busbw of raw MPI.Allreduce and of the bucketed gradient path."""
    threads = configure_threads(0, world)
    device = world.select_device(args.device)
    header(world, "allreduce", threads)
    overlap = resolve_overlap(args.overlap, world.cores_per_rank(), device.type == "cuda", world.thread_multiple)
    # one CUDA path for raw, bucketed and hierarchical: the agreed one (MPITRAIN_CUDA_AWARE=0/1 picks it);
    # no per-size probe switches the others' path behind the header's back
    path = "direct" if world.direct_cuda else "staged"
    if world.is_root:
        print(f"# on {device}{' (' + _cuda_path(path) + ')' if device.type == 'cuda' else ''}"
              f"; bucketed path: {args.bucket_mb} MB buckets (first 1 MB), overlap '{overlap}', "
              f"8 tensors per message size; median of 3 x {args.iters} iterations, slowest rank")
    n = world.size
    hier = NodeHierarchy(world.comm)
    if world.is_root:
        print(f"# hierarchical: sum in each of the {hier.nodes} node(s), over one leader per node, broadcast")
        print(f"{'bytes':>10s} {'raw ms':>9s} {'raw algbw':>10s} {'raw busbw':>10s} "
              f"{'bucket ms':>10s} {'bkt algbw':>10s} {'bkt busbw':>10s} {'bkt/raw':>8s} "
              f"{'hier ms':>9s} {'raw/hier':>9s}   (GB/s; raw/hier > 1: hierarchical is faster)")
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        count = max(1, size // 4)
        buf = torch.ones(count, device=device)
        # the bucketed path on 8 "parameters" of the same total size
        pieces = [nn.Parameter(torch.zeros(c, device=device)) for c in _split(count, 8)]
        bk = GradBuckets(pieces, world, bucket_bytes=int(args.bucket_mb * 2**20),
                         first_bucket_bytes=2**20, overlap=overlap, average=False, cuda_path=path)

        def raw():
            world.allreduce_(buf)

        def hierarchical():
            buffers.allreduce_(world.comm, buf, direct=world.direct_cuda, via=hier)

        def bucketed():
            for p in reversed(pieces):
                bk.grad_ready(p)
            bk.finish()
        t = {}
        for name, fn in (("raw", raw), ("bucketed", bucketed), ("hier", hierarchical)):
            fn()
            times = []
            for _ in range(3):
                world.barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                sync_device(device)
                times.append(world.max(time.perf_counter() - t0) / args.iters)
            t[name] = statistics.median(times)
        bk.close()
        if world.is_root:
            nbytes = count * 4
            alg = {k: nbytes / v / 1e9 for k, v in t.items()}
            bus = {k: a * 2 * (n - 1) / n for k, a in alg.items()}
            print(f"{nbytes:10d} {t['raw'] * 1e3:9.3f} {alg['raw']:10.3f} {bus['raw']:10.3f} "
                  f"{t['bucketed'] * 1e3:10.3f} {alg['bucketed']:10.3f} {bus['bucketed']:10.3f} "
                  f"{alg['bucketed'] / alg['raw']:8.2f} {t['hier'] * 1e3:9.3f} {t['raw'] / t['hier']:9.2f}")
    hier.free()


def _cuda_path(path: str) -> str:
    """The header's words for the CUDA path the variants took."""
    return f"CUDA {path}" + (" (overlap 'nonblocking' stages always)" if path == "direct" else "")


def _split(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [c for c in [base + (1 if i < extra else 0) for i in range(k)] if c > 0]


def straggler(args, world, log) -> None:
    """Collective: the runs of a comparison file with one rank `factor` x slower; throughput,
    time to the target accuracy and final accuracy, with ratios to the first run."""
    import json

    from ..compare import load_compare, train_each

    spec = world.agree(load_compare, args.spec)
    slow = args.rank if world.size > 1 else -1
    cfgs = train_each(spec, world, log, [f"train.slowdown_rank={slow}", f"train.slowdown_factor={args.factor}",
                                         "train.progress=false", "train.resume=never", "output.checkpoint_every=0",
                                         *args.overrides])
    if not world.is_root:
        return
    results = {}
    for cfg in cfgs:
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        hit = next((r["wall_s"] for r in rows if r.get("test_acc", 0) >= spec.target), None)
        results[cfg.output.name] = (statistics.median(r["samples_per_s"] for r in rows), hit, rows[-1]["test_acc"],
                                    max((r.get("staleness_max", 0) for r in rows), default=0))
    print(f"# mpitrain bench straggler: {world.size} ranks, rank {slow} {args.factor}x slower, {spec.job} "
          f"({args.spec}), target test accuracy {spec.target}, {date.today()}")
    ref_rate, ref_hit, _, _ = next(iter(results.values()))
    print(f"{'run':24s} {'samples/s':>10s} {'x first':>7s} {'t->target s':>12s} {'x first':>7s} "
          f"{'final acc':>9s} {'max stale':>9s}")
    for name, (rate, hit, acc, stale) in results.items():
        t = f"{hit:12.1f}" if hit is not None else f"{'never':>12s}"
        speed = f"{ref_hit / hit:7.2f}" if hit and ref_hit else f"{'-':>7s}"
        print(f"{name:24s} {rate:10.0f} {rate / ref_rate:7.2f} {t} {speed} {acc:9.4f} {stale:9d}")
