"""`mpitrain bench pipeline`: a GPT split into P pipeline stages x D = N / P replicas, for
each layout, schedule and number of micro-batches: ms/step, samples/s, the measured bubble
(the share of a step a stage spends waiting, mean over stages) next to (P - 1) / (m + P - 1),
the most micro-batches a stage held next to what the schedule promises, and the largest
stage's parameters.

Collective. Random token windows (the cost of a step does not depend on the text), every
replica a batch of `--batch` windows per step; rounds interleave the variants and the
median is reported (timing.time_rounds is for whole models; pipelines differ per rank, so
this bench times its own rounds the same way: warm-up, then `--steps` steps per round).
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from ..models.gpt import GPT
from ..parallel.pipeline import pipeline
from ..train import configure_threads
from .timing import header
from ..progress import bar


def _lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run(args, world, log) -> None:
    header(world, "pipeline", configure_threads(0, world))
    stages = [p for p in _ints(args.stages) if world.size % p == 0]
    layouts = list(itertools.product(stages, args.schedules.split(","), _ints(args.micro)))
    gen = torch.Generator().manual_seed(world.rank)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    pipes = {}
    for p, schedule, m in layouts:
        torch.manual_seed(0)
        model = GPT(args.vocab, args.seq, args.layers, args.heads, args.width, 0.0, False)
        pipes[(p, schedule, m)] = pipeline(model.pipeline_blocks(), stages=p, micro_batches=m, schedule=schedule,
                                           loss_fn=_lm_loss, world=world)
    times: dict = {k: [] for k in pipes}
    busy: dict = {k: [] for k in pipes}
    for r in bar(range(args.repeats + 1), desc="rounds", unit="round", show=world.is_root):  # round 0 warms up
        for key, pipe in pipes.items():
            world.barrier()
            t0 = time.perf_counter()
            spent = 0.0
            for _ in range(args.steps if r else 1):
                pipe.step(x, y)
                pipe.module.zero_grad(set_to_none=True)
                spent += pipe.busy
            elapsed = world.max((time.perf_counter() - t0) / (args.steps if r else 1))
            if r:
                times[key].append(elapsed)
                busy[key].append(spent / args.steps)
    rows = []
    for key, pipe in pipes.items():
        p, schedule, m = key
        step = statistics.median(times[key])
        waiting = world.sum(1.0 - statistics.median(busy[key]) / step) / world.size
        params = world.max(float(sum(t.numel() for t in pipe.module.parameters())))
        held = world.max(float(pipe.held_peak))
        promised = world.max(float(pipe.promised))
        rows.append((p, world.size // p, schedule, m, step, (world.size // p) * args.batch / step, waiting,
                     (p - 1) / (m + p - 1), held, promised, params))
        pipe.free()
    if world.is_root:
        print(f"# GPT {args.layers} layers x {args.width} wide, {args.heads} heads, {args.seq} tokens, vocab "
              f"{args.vocab}; {args.batch} windows per replica per step; medians of {args.repeats} rounds of "
              f"{args.steps} steps")
        print("| P | D | schedule | m | ms/step | samples/s | bubble measured | (P-1)/(m+P-1) | held (promised) | "
              "parameters per rank |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for p, d, schedule, m, step, sps, waiting, theory, held, promised, params in rows:
            print(f"| {p} | {d} | {schedule} | {m} | {step * 1e3:.1f} | {sps:.1f} | {waiting:.2f} | {theory:.2f} | "
                  f"{held:.0f} ({promised:.0f}) | {params:,.0f} |")
