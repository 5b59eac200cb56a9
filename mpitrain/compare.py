"""`mpitrain compare FILE.toml`: the comparison file (CompareSpec) and its runs, trained
in turn at the current world size (`train_each`); report.py tabulates and plots them."""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import config
from .errors import UserError
from .progress import bar
from .report import check_target
from .train import train


@dataclass(frozen=True)
class CompareSpec:
    job: Path
    out: Path
    target: float
    overrides: tuple[str, ...]
    runs: tuple[tuple[str, tuple[str, ...]], ...]
    title: str
    metric: str = "test_acc"

    def run_dir(self, name: str) -> Path:
        """The folder of run `name`: out/<name, with only safe characters>."""
        return self.out / "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


def load_compare(path: str) -> CompareSpec:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: no such comparison file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: malformed TOML: {e}") from None
    known = {"job", "out", "metric", "target", "set", "run", "title"}
    for k in raw:
        if k not in known:
            raise UserError(f"{p}: unknown key {k} (known: {', '.join(sorted(known))})")
    if not isinstance(raw.get("job"), str):
        raise UserError(f"{p}: job: expected the base job file (a string)")
    job = (p.parent / raw["job"]) if not Path(raw["job"]).is_absolute() else Path(raw["job"])
    metric, target = raw.get("metric", "test_acc"), raw.get("target", 0.97)
    if why := check_target(metric, target):
        raise UserError(f"{p}: {why}")
    runs, names = [], set()
    for i, r in enumerate(raw.get("run", [])):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or set(r) - {"name", "set"}:
            raise UserError(f"{p}: run[{i}]: expected a table with name and set")
        if r["name"] in names:
            raise UserError(f"{p}: run name {r['name']!r} appears twice")
        names.add(r["name"])
        runs.append((r["name"], tuple(_strings(p, f"run[{i}].set", r.get("set", [])))))
    if not runs:
        raise UserError(f"{p}: no [[run]] tables")
    return CompareSpec(job, Path(raw.get("out", f"runs/{p.stem}")), float(target),
                       tuple(_strings(p, "set", raw.get("set", []))), tuple(runs), str(raw.get("title", p.stem)),
                       metric)


def _strings(p, key, v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{p}: {key}: expected a list of 'section.key=value' strings")
    return v


def train_each(spec: CompareSpec, world, log, overrides=()) -> list:
    """Collective: the runs of a comparison, every one validated before any trains, then
    trained in turn with only warnings logged; returns their configs."""
    cfgs = [world.agree(config.load, spec.job, [*spec.overrides, *overrides, *extra,
                                                f"output.dir={spec.run_dir(name)}", f"output.name={name}"])
            for name, extra in spec.runs]
    level = log.level
    for cfg in bar(cfgs, desc=spec.title or "compare", unit="run", show=world.is_root):
        if world.is_root:
            log.info(f"{spec.title}: {cfg.output.name} ({cfg.sync.strategy})")
        log.setLevel(logging.WARNING)
        world.barrier()
        train(cfg, world, log)
        log.setLevel(level)
    return cfgs
