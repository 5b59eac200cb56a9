"""Strategy comparison: run a job under several strategies, then tabulate and plot.

`mpitrain compare FILE.toml` trains the same base job once per `[[run]]` (in turn, at the
current world size: compare.py) and writes into `out`: table.md, table.csv,
<metric>_vs_time.png and <metric>_vs_epoch.png. `mpitrain report RUN_DIR...` rebuilds them
from existing runs' metrics.jsonl (rank 0 only, no MPI needed). The metric is test_acc
(higher is better) or test_loss / test_ppl / test_mse (lower is better); the time to target
is the wall time of the first evaluation that reaches the target.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import trace
from .errors import UserError

METRICS = ("test_acc", "test_loss", "test_ppl", "test_mse")
NUMERIC = ("epoch", "step", "ranks", "samples_per_s", "wall_s", "comm_bytes_per_step", *METRICS)


def columns(metric: str) -> list[str]:
    return ["run", "strategy", "ranks", "epochs", f"final_{metric}", f"best_{metric}", "time_to_target_s",
            "samples_per_s", "comm_bytes_per_step", "wall_s", "comm_hidden"]


def check_target(metric: str, target) -> str | None:
    """Why (metric, target) is not a goal, or None."""
    if metric not in METRICS:
        return f"metric: expected one of {', '.join(METRICS)}, got {metric!r}"
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) \
            or target <= 0 or (metric == "test_acc" and target > 1):
        return f"target: expected a number in {'(0, 1]' if metric == 'test_acc' else '(0, inf)'}, got {target!r}"
    return None


@dataclass
class RunSummary:
    name: str
    strategy: str
    ranks: int | None
    rows: list[dict]
    target: float
    metric: str = "test_acc"
    hidden: float | None = None  # share of the bucket reductions hidden behind backward (trace.json)

    def reached(self, value: float) -> bool:
        return value >= self.target if self.metric == "test_acc" else value <= self.target

    def values(self) -> dict:
        m = self.metric
        acc = [r for r in self.rows if m in r]
        hit = next((r["wall_s"] for r in acc if self.reached(r[m])), None)
        comm = [r["comm_bytes_per_step"] for r in self.rows if "comm_bytes_per_step" in r]
        best = max if m == "test_acc" else min
        return {"run": self.name, "strategy": self.strategy, "ranks": self.ranks, "epochs": self.rows[-1]["epoch"],
                f"final_{m}": acc[-1][m] if acc else None,
                f"best_{m}": best(r[m] for r in acc) if acc else None,
                "time_to_target_s": hit,
                "samples_per_s": statistics.median(r["samples_per_s"] for r in self.rows),
                "comm_bytes_per_step": statistics.mean(comm) if comm else None,
                "wall_s": self.rows[-1]["wall_s"], "comm_hidden": self.hidden}


def load_run(run_dir: str | Path, target: float, metric: str = "test_acc") -> RunSummary:
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such run folder")
    mfile = d / "metrics.jsonl"
    if not mfile.is_file():
        raise UserError(f"{d}: not a run folder (no metrics.jsonl)")
    rows = []
    for i, line in enumerate(mfile.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{mfile}:{i}: not a JSON line") from None
    if not rows:
        raise UserError(f"{mfile}: empty (the run did not finish an epoch)")
    missing = [k for k in ("epoch", "samples_per_s", "wall_s") if not isinstance(rows[-1], dict) or k not in rows[-1]]
    if missing:
        raise UserError(f"{mfile}: rows lack {', '.join(missing)}")
    for i, row in enumerate(rows, 1):
        bad = [k for k in NUMERIC if k in row and (isinstance(row[k], bool) or not isinstance(row[k], (int, float)))]
        if not isinstance(row, dict) or bad:
            raise UserError(f"{mfile}:{i}: " + (f"{', '.join(bad)} must be numbers" if bad else "not a table"))
    strategy, ranks, name = "?", None, d.name
    cfile = d / "config.toml"
    if cfile.is_file():
        try:
            cfg = tomllib.loads(cfile.read_text())
            strategy = cfg.get("sync", {}).get("strategy", "?")
            name = cfg.get("output", {}).get("name") or name
        except tomllib.TOMLDecodeError:
            raise UserError(f"{cfile}: malformed TOML") from None
    ranks = rows[-1].get("ranks")
    hidden = None
    if (d / "trace.json").is_file():  # train.trace = true
        try:
            hidden = trace.hidden_fraction(json.loads((d / "trace.json").read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{d / 'trace.json'}: not a trace written by mpitrain") from None
    return RunSummary(name, strategy, ranks, rows, target, metric, hidden)


def _fmt(v, kind):
    if v is None:
        return "—"
    fmt = {"acc": "{:.4f}".format, "s": "{:.1f}".format, "rate": "{:,.0f}".format, "bytes": _human,
           "pct": "{:.0%}".format}
    return fmt.get(kind, str)(v)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return str(n)


def write_report(runs: list[RunSummary], out: str | Path, target: float, title: str = "",
                 metric: str = "test_acc") -> list[Path]:
    """Write table.md, table.csv and the two PNG plots; returns their paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create report folder: {e.strerror}") from None
    vals = [r.values() for r in runs]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(metric))
        w.writeheader()
        w.writerows(vals)
    kinds = {f"final_{metric}": "acc", f"best_{metric}": "acc", "time_to_target_s": "s", "samples_per_s": "rate",
             "comm_bytes_per_step": "bytes", "wall_s": "s", "comm_hidden": "pct"}
    what, goal = metric.replace("_", " "), f"{target:.0%}" if metric == "test_acc" else f"{target:g}"
    heads = ["run", "strategy", "ranks", "epochs", f"final {what}", f"best {what}", f"time to {goal} (s)",
             "samples/s", "comm bytes/step (per rank)", "wall (s)", "comm hidden behind backward"]
    lines = [f"# {title}" if title else "# strategy comparison", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for v in vals:
        lines.append("| " + " | ".join(_fmt(v[c], kinds.get(c)) for c in columns(metric)) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return [out / "table.md", out / "table.csv", *_plots(runs, out, target, title, metric)]


def _plots(runs, out, target, title, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, acc = [], metric == "test_acc"
    name = "accuracy" if acc else metric.removeprefix("test_")
    for xkey, xlabel, fname in (("wall_s", "wall time (s)", f"{name}_vs_time.png"),
                                ("epoch", "epoch", f"{name}_vs_epoch.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
        lo = 1.0
        for r in runs:
            pts = [(row[xkey], row[metric]) for row in r.rows if metric in row]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=f"{r.name}")
                lo = min(lo, min(ys))
        ax.axhline(target, color="grey", linestyle=":", linewidth=1,
                   label=f"target {target:.0%}" if acc else f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("_", " ").replace("acc", "accuracy"))
        if acc:
            ax.set_ylim(max(0.0, math.floor(min(lo, target) * 20) / 20 - 0.05), 1.0)
        ax.set_title(title or f"{metric.replace('_', ' ')} per strategy")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right" if acc else "upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def report(run_dirs: list[str], out: str, target: float, title: str = "", metric: str = "test_acc") -> str:
    if why := check_target(metric, target):
        raise UserError(f"--{why}")
    runs = [load_run(d, target, metric) for d in run_dirs]
    paths = write_report(runs, out, target, title, metric)
    hidden = [f"{r.name}: {r.hidden:.0%} of the gradient reductions ran hidden behind backward"
              for r in runs if r.hidden is not None]
    return "\n".join(["wrote " + ", ".join(str(p) for p in paths), *hidden])
