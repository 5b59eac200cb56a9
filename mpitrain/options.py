"""Typed option fields and their validation, shared by the job config and the strategies'
own `Options` dataclasses. No imports from the rest of the package."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field

from .errors import UserError


def opt(default, *, choices=None, min=None, gt=None, max=None, lt=None, help=""):
    """A dataclass field with validation metadata: choices, bounds min <= v <= max and
    gt < v < lt (floats must also be finite)."""
    meta = {"choices": choices, "min": min, "gt": gt, "max": max, "lt": lt, "help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def check(where: str, key: str, f: dataclasses.Field, hint, value):
    """Return `value` converted to the field's type, or raise UserError."""
    def bad(expect):
        raise UserError(f"{where}: {key}: expected {expect}, got {value!r}")

    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            bad("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad("an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("a number")
        value = float(value)
        if not math.isfinite(value):
            bad("a finite number")
    elif hint is str:
        if not isinstance(value, str):
            bad("a string")
    elif hint is dict:
        if not isinstance(value, dict):
            bad("a table")
    elif origin is types.UnionType:  # e.g. bool | str: true, false or "auto"
        kinds = typing.get_args(hint)
        if not isinstance(value, kinds) or (isinstance(value, int) and not isinstance(value, bool)):
            bad(" or ".join({bool: "true or false", str: "a string"}.get(k, k.__name__) for k in kinds))
    elif origin is tuple:
        (elem, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            bad(f"a list of {elem.__name__}s")
        value = tuple(check(where, f"{key}[{i}]", f, elem, v) for i, v in enumerate(value))
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        bad("one of " + ", ".join(map(repr, meta["choices"])))
    if meta.get("min") is not None and value < meta["min"]:
        bad(f"a value >= {meta['min']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        bad(f"a value > {meta['gt']}")
    if meta.get("max") is not None and value > meta["max"]:
        bad(f"a value <= {meta['max']}")
    if meta.get("lt") is not None and value >= meta["lt"]:
        bad(f"a value < {meta['lt']}")
    return value


def build(cls, table: dict, where: str, prefix: str):
    """Validate a TOML table into the frozen dataclass `cls` (keys named `prefix.key`)."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: {prefix}: expected a table [{prefix}]")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {prefix}.{key} (known: {', '.join(fields) or 'none'})")
        kwargs[key] = check(where, f"{prefix}.{key}", fields[key], hints[key], value)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """A frozen options dataclass as a TOML-ready dict (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()
            if not (isinstance(v, dict) and not v)}  # an empty table is the default: omitted
