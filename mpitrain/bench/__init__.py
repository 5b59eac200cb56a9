"""`mpitrain bench ...`: every speed and memory target is a benchmark that prints ratios
against a baseline measured in the same run (never a timed assertion).

    micro.py      step (the bucketed gradient path vs compute only, a naive allreduce and
                  DDP), allreduce (algbw / busbw, flat vs hierarchical), straggler
    e2e.py        a job's own training step vs one process and torch DDP
    model.py      the fitted cost model's predictions against measured step times
    pipeline.py   a GPT in pipeline stages x replicas: step time, bubble, activations held
    memory.py     bytes of parameters, gradients, optimizer state and peak RSS per rank:
                  allreduce vs zero stage 1 and 2, next to the formulas
    costmodel.py  the alpha-beta cost model (no MPI)
    timing.py     what they share: variants, interleaved rounds, the header, the gloo group
"""

from __future__ import annotations


def step(args, world, log) -> None:
    """Collective: ms/step of the bucketed gradient path against its baselines."""
    from .micro import step as run

    run(args, world, log)


def allreduce(args, world, log) -> None:
    """Collective: algbw and busbw of raw MPI.Allreduce, the bucketed path, hierarchical."""
    from .micro import allreduce as run

    run(args, world, log)


def straggler(args, world, log) -> None:
    """Collective: a comparison file's runs with one rank slowed down."""
    from .micro import straggler as run

    run(args, world, log)


def e2e(args, world, log) -> None:
    """Collective: the job's own training step vs one process on all cores and torch DDP-gloo."""
    from .e2e import run

    run(args, world, log)


def model(args, world, log) -> None:
    """Collective: the fitted cost model's predictions against measured step times."""
    from .model import run

    run(args, world, log)


def memory(args, world, log) -> None:
    """Collective: per-rank memory of allreduce, zero-1 and zero-2 next to the formulas."""
    from .memory import run

    run(args, world, log)


def pipeline(args, world, log) -> None:
    """Collective: pipeline layouts, schedules and micro-batch counts of a GPT."""
    from .pipeline import run

    run(args, world, log)
