"""`mpitrain bench memory`: per rank, the bytes of parameters, gradients and optimizer state,
and the peak RSS, of a job's model under allreduce, zero stage 1 and zero stage 2, and split into 2 or 4
pipeline stages or tensor ranks, each measured next to its formula.

Collective. For each variant in turn, in this one process: free what the last one held
(gc, malloc_trim), reset the kernel's peak-RSS mark (/proc/self/clear_refs), build the job
with the variant's overrides (train.build), take `--steps` steps of its own Step, then
count the tensors the step keeps (each storage once) and read the peak RSS above the RSS at
the variant's start. The largest figure over ranks is printed. Formulas (Ψ values, N
ranks, K optimizer bytes per value as measured under the first variant): parameters 4Ψ;
gradients allreduce 4Ψ, zero-1 4Ψ + 4Ψ/N, zero-2 4Ψ/N (plus up to two buckets in flight,
not held after the step); optimizer KΨ, zero K Ψ/N.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import shutil
import tempfile
from pathlib import Path

import torch

from .. import config, train
from ..faults import collective_cleanup
from .e2e import groups, mpitrain_step
from .timing import header
from ..progress import bar

VARIANTS = {"allreduce": ["sync.strategy=allreduce"],
            "zero-1": ["sync.strategy=zero", "sync.zero.stage=1"],
            "zero-2": ["sync.strategy=zero", "sync.zero.stage=2"],
            # the model split into P pipeline stages (allreduce over each stage's N/P replicas; every
            # replica reads train.batch_size samples per step, in 4 micro-batches)
            **{f"pipeline-{p}": ["sync.strategy=allreduce", f"parallel.pipeline_stages={p}", "parallel.micro_batches=4",
                                 "data.mode=replicated", "train.accumulate=1"] for p in (2, 4)},
            # the gpt's layers split over T ranks (allreduce over the N/T replicas)
            **{f"tensor-{t}": ["sync.strategy=allreduce", f"parallel.tensor={t}", "data.mode=replicated"]
               for t in (2, 4)}}


DEFAULT = ("allreduce", "zero-1", "zero-2")  # (model-parallel variants: on request, where the layout fits)


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fresh() -> bool:
    """Return freed memory to the system and reset the peak-RSS mark; False where the
    mark cannot be reset (then the peak is not reported)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under these tensors (views counted once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _held(job) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds now."""
    model_params = list(job.model.parameters())
    opt_params = [p for g in job.optimizer.param_groups for p in g["params"]]
    state = [t for s in job.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {"params": _storage_bytes(model_params),
            "grads": _storage_bytes([p.grad for p in model_params] + [p.grad for p in opt_params]),
            "optim": _storage_bytes(state)}


def _measure(args, world, log, name: str, tmp: str) -> dict[str, float]:
    extra = [f"output.dir={tmp!r}", "train.progress=false", "train.resume=never", "output.checkpoint_every=0",
             f"output.name={name}"]
    reset = _fresh()
    start = _status("VmRSS")
    with collective_cleanup() as resources:
        cfg = world.agree(config.load, args.job, [*args.overrides, *VARIANTS[name], *extra])
        job = world.agree(train.build, cfg, world, log, resources)
        job.strategy.setup(job.model, job.optimizer, resources)
        step = mpitrain_step(job)
        for _, group in zip(range(args.steps), groups(job.sampler, cfg.train.accumulate)):
            step(group)
        held = _held(job)
        psi = sum(p.numel() for p in job.model.parameters())
        layout = job.step.stages or job.step.tensor
        whole = layout.total_params if layout is not None else psi
        peak = _status("VmHWM") - start if reset else float("nan")
        del job, step
    out = {k: float(world.max(float(v))) for k, v in held.items()}
    out["peak"] = float(world.max(peak))
    out["psi"] = float(world.max(float(psi)))  # (a pipeline: the largest stage's)
    out["whole"] = whole
    return out


def run(args, world, log) -> None:
    names = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else \
        list(DEFAULT)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        from ..errors import UserError

        raise UserError(f"bench memory: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    header(world, "memory", train.configure_threads(0, world))
    tmp = world.bcast(tempfile.mkdtemp(prefix="mpitrain-bench-memory-") if world.is_root else None)
    try:
        got = {n: _measure(args, world, log, n, tmp) for n in bar(names, desc="bench memory", unit="variant",
                                                                  show=world.is_root)}
    finally:
        world.barrier()
        if world.is_root:
            shutil.rmtree(tmp, ignore_errors=True)
    if world.is_root:
        _report(got, world.size)


def _report(got: dict, n: int) -> None:
    mb = 1 / 2**20
    first = next(iter(got.values()))
    psi = first["whole"]
    name0 = next(iter(got))  # K: optimizer bytes per parameter, from the first variant measured
    k = got[name0]["optim"] * (n if name0.startswith("zero") else 1) / first["psi"]
    formula = {"allreduce": (4 * psi, 4 * psi, k * psi), "zero-1": (4 * psi, 4 * psi + 4 * psi / n, k * psi / n),
               "zero-2": (4 * psi, 4 * psi / n, k * psi / n)}
    for p in (2, 4):  # stages of equal size: 1/P of everything (the largest stage's measured share: "stage")
        formula[f"pipeline-{p}"] = (4 * psi / p, 4 * psi / p, k * psi / p)
        formula[f"tensor-{p}"] = (4 * psi / p, 4 * psi / p, k * psi / p)  # (+ the replicated LayerNorms, wpe)
    print(f"# {psi:,} parameters, {n} ranks, optimizer {k:.0f} bytes/parameter (measured under {name0}); "
          "MB per rank, the largest over ranks; formula in ()")
    print(f"{'variant':<10} {'params':>18} {'grads':>18} {'optimizer':>18} {'peak RSS':>9} {'optim vs allreduce':>19}")
    base = got.get("allreduce", {}).get("optim")
    for name, g in got.items():
        f = formula[name]
        ratio = f"{g['optim'] / base:.3f}" if base else "-"
        stage = f"  (largest part: {g['psi'] / psi:.2f} of the model)" if name.startswith(("pipeline", "tensor")) else ""
        print(f"{name:<10} " + " ".join(f"{f'{g[key] * mb:.3f} ({fv * mb:.3f})':>18}"
                                        for key, fv in zip(("params", "grads", "optim"), f))
              + f" {g['peak'] * mb:>9.1f} {ratio:>19}{stage}")
