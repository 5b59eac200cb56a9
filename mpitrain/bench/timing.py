"""What every benchmark shares: the header line, sizes, the timed variants and their
interleaved rounds (the slowest rank's time, median round), the DDP baseline's gloo group,
and running rank 0 alone on all of a node's cores."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from datetime import date

import torch

from ..comm import heartbeat
from ..comm.world import library_version
from ..train import configure_threads
from ..progress import bar


class Variant:
    """One way of training to time: `step()` (or `step(group)` with a `stream` of step
    inputs) does one optimizer step and returns the global samples it took (or None);
    `kind` groups variants (e.g. "mpitrain", "ddp", "single"); `close` releases it."""

    def __init__(self, label, model, step, *, kind="", precision="fp32", stream=None, device=None,
                 close=lambda: None):
        self.label, self.model, self.step, self.kind, self.precision = label, model, step, kind, precision
        self.stream, self.device, self.close = stream, device or torch.device("cpu"), close

    def run(self, n: int) -> tuple[float, int]:
        """(seconds, global samples) of n steps."""
        t0, samples = time.perf_counter(), 0
        for _ in range(n):
            samples += (self.step(next(self.stream)) if self.stream is not None else self.step()) or 0
            heartbeat.tick()
        sync_device(self.device)
        return time.perf_counter() - t0, samples


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def header(world, what: str, threads: int) -> None:
    if world.is_root:
        print(f"# mpitrain bench {what}: {world.size} ranks x {threads} threads, "
              f"{platform.processor() or platform.machine()}, {date.today()}, "
              f"{library_version().replace(chr(0), '')}, torch {torch.__version__}")  # Open MPI ends it with a NUL


def sync_device(device) -> None:
    """Wait for the GPU's queued work before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_gloo(world) -> None:
    """Collective: a torch.distributed gloo process group over the same ranks (for the DDP
    baseline); the caller destroys it."""
    import torch.distributed as dist

    if world.is_root:
        s = socket.socket()
        s.bind(("", 0))
        port = s.getsockname()[1]
        s.close()
        same_node = world.local_size == world.size
        addr = "127.0.0.1" if same_node else socket.gethostbyname(socket.gethostname())
    else:
        addr, port = None, None
    addr, port = world.bcast((addr, port))
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=world.rank,
                            world_size=world.size)


def time_rounds(variants, args, world, cores) -> dict:
    """Collective: per variant, each round's (ms/step, global samples/s); variants take
    turns within a round; warm-up steps before the first, one untimed step before later ones."""
    rounds = {id(v): [] for v in variants}
    for r in bar(range(args.repeats), desc="rounds", unit="round", show=world.is_root):
        for v in variants:
            warm = args.warmup if r == 0 else 1
            if v.kind == "single":  # rank 0 alone on all the cores; the others sleep
                dt = n = None
                if world.is_root:
                    with all_cores(cores, world):
                        v.run(warm)
                        dt, n = v.run(args.steps)
                idle_barrier(world)
                dt, n = world.bcast((dt, n))
            else:
                v.run(warm)
                world.barrier()
                dt, n = v.run(args.steps)
                dt = world.max(dt)
            rounds[id(v)].append((dt / args.steps * 1e3, n / dt))
    return rounds


def node_cores(world) -> set[int]:
    """Collective: the cores the job's ranks on rank 0's node may run on (the union of
    their affinity masks: all of the node's cores the launcher gave the job)."""
    masks = world.allgather((socket.gethostname(), sorted(os.sched_getaffinity(0))))
    return {c for host, mask in masks if host == masks[0][0] for c in mask}


@contextlib.contextmanager
def all_cores(cores: set[int], world):
    """Rank 0: run on all of `cores` with one torch thread each (a launcher binds a rank to
    one core; threads made inside inherit the wider mask), then back to the rank's share."""
    before = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        configure_threads(0, world)


def idle_barrier(world) -> None:
    """Collective: a barrier that sleeps instead of spinning (ranks waiting for rank 0's
    one-process run must leave it the cores)."""
    req = world.comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)
