"""A timeline of the run (train.trace = true): Chrome trace events (the Trace Event
Format that Perfetto and chrome://tracing open), one track per rank and one per rank's
communication thread. Spans: data, forward, backward, reduce (the strategy after
backward), optimizer, wait (the per-step agreement), evaluation, checkpoint, and each
gradient bucket's reduction from launch to completion. Rank 0 merges every rank's events
into RUN_DIR/trace.json. No MPI here; off, every call is a no-op.

The spans are host time. On a CPU that is the work itself; where the process drives a GPU
they time kernel launches, not GPU work (backward's span ends when its kernels are queued),
so the trace says so (`otherData.clock = "launch"`) and `hidden_fraction` does not claim
to know how much communication ran hidden behind backward there.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
import time

_CURRENT: "Tracer | None" = None
CLOCK_NOTE = ("on CUDA the spans time kernel launches, not GPU work: how much communication ran hidden "
              "behind backward is not measured")


class Tracer:
    """This rank's events. Times are microseconds since `start()`, which every rank calls
    right after a barrier, so the ranks' tracks line up (to the barrier's skew)."""

    def __init__(self, rank: int):
        self.rank, self.events, self._t0 = rank, [], time.perf_counter_ns()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._t0 = time.perf_counter_ns()

    def now(self) -> int:
        return time.perf_counter_ns()

    @staticmethod
    def clock() -> str:
        """What the spans measure: "host" (the work, on CPUs) or "launch" (this process has
        used CUDA: kernel launches, not GPU work)."""
        torch = sys.modules.get("torch")
        return "launch" if torch is not None and torch.cuda.is_initialized() else "host"

    def add(self, name: str, begin_ns: int, end_ns: int, track: str = "main", **args) -> None:
        ev = {"name": name, "ph": "X", "pid": self.rank, "tid": track, "ts": (begin_ns - self._t0) / 1e3,
              "dur": (end_ns - begin_ns) / 1e3}
        if args:
            ev["args"] = args
        with self._lock:  # the comm thread adds too
            self.events.append(ev)

    @contextlib.contextmanager
    def span(self, name: str, track: str = "main", **args):
        begin = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add(name, begin, time.perf_counter_ns(), track, **args)


class _Off:
    """The tracer when tracing is off: spans cost one call."""

    def add(self, *args, **kwargs) -> None:
        pass

    def now(self) -> int:
        return 0

    def span(self, *args, **kwargs):
        return contextlib.nullcontext()


OFF = _Off()


def current():
    """The run's tracer, or OFF."""
    return _CURRENT or OFF


@contextlib.contextmanager
def tracing(tracer: Tracer | None):
    """Within the block, `current()` is `tracer` (None: off)."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, tracer
    try:
        yield
    finally:
        _CURRENT = previous


def merge(gathered: list[list[dict]], clock: str = "host") -> dict:
    """Every rank's events as one trace, with track names and what the times measure
    (`clock`: "host" or "launch", see Tracer.clock)."""
    events = []
    for rank, evs in enumerate(gathered):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for tid in sorted({e["tid"] for e in evs}):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": "communication thread" if tid == "comm" else "training"}})
        events.extend(evs)
    other = {"clock": clock} if clock == "host" else {"clock": clock, "note": CLOCK_NOTE}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def overlap_note(trace: dict) -> str | None:
    """Why the trace's overlap of communication with backward is not measured (None: it is)."""
    other = trace.get("otherData") or {}
    return None if other.get("clock", "host") == "host" else other.get("note", CLOCK_NOTE)


def hidden_fraction(trace: dict) -> float | None:
    """The share of bucket-reduction time that ran while the same rank was in backward
    (communication hidden behind computation), over all ranks; None without reductions,
    and None where the spans are launch times (a CUDA run: overlap_note says why)."""
    if overlap_note(trace) is not None:
        return None
    total = hidden = 0.0
    by_rank: dict = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X":
            by_rank.setdefault(e["pid"], []).append(e)
    for evs in by_rank.values():
        backward = [(e["ts"], e["ts"] + e["dur"]) for e in evs if e["name"] == "backward"]
        for e in evs:
            if e["name"] == "bucket":
                a, b = e["ts"], e["ts"] + e["dur"]
                total += b - a
                hidden += sum(max(0.0, min(b, d) - max(a, c)) for c, d in backward)
    return hidden / total if total else None


def write(path, trace: dict) -> None:
    """Replace `path` atomically, never through a symlink planted there."""
    from .files import replace_text

    replace_text(Path(path), json.dumps(trace))


def save(world, tracer: Tracer, path, log) -> None:
    """Collective: rank 0 merges every rank's events into `path` (RUN_DIR/trace.json)."""
    gathered = world.gather((tracer.clock(), tracer.events))

    def write_merged():
        clocks = {c for c, _ in gathered}
        clock = "host" if clocks == {"host"} else "launch"
        try:
            write(path, merge([evs for _, evs in gathered], clock))
        except OSError as e:
            from .errors import UserError

            raise UserError(f"{path}: cannot write the trace: {e.strerror or e}") from None
        log.info(f"timeline of {len(gathered)} ranks in {path} (open it in https://ui.perfetto.dev)"
                 + ("" if clock == "host" else f"; {CLOCK_NOTE}"))
    world.on_root(write_merged)
