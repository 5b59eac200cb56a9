"""Typed option fields and their validation, shared by the job config and the strategies'
own `Options` dataclasses. No imports from the rest of the package."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import field

from .errors import UserError


def opt(default, *, choices=None, min=None, gt=None, max=None, lt=None, help=""):
    """A dataclass field with validation metadata: choices, bounds min <= v <= max and
    gt < v < lt (floats must also be finite). A default that is itself an options
    dataclass makes a nested table (`[prefix.key]`, validated by `check` recursively)."""
    meta = {"choices": choices, "min": min, "gt": gt, "max": max, "lt": lt, "help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    if dataclasses.is_dataclass(default):  # frozen: one shared instance is safe
        return field(default_factory=lambda: default, metadata=meta)
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
    elif dataclasses.is_dataclass(hint):  # a nested options table [key]
        if not isinstance(value, dict):
            bad(f"a table [{key}]")
        # a class may validate its table itself (e.g. a kind selecting further keys)
        return hint.from_table(value, where, key) if hasattr(hint, "from_table") else build(hint, value, where, key)
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
    """A frozen options dataclass as a TOML-ready dict (tuples as lists, nested options
    tables as dicts, through their `to_table()` where they have one): what `build` reads
    back into an equal object."""
    if hasattr(obj, "to_table"):
        return obj.to_table()
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            if not v:
                continue  # an empty table is the default: omitted
            v = copy.deepcopy(v)
        out[f.name] = v
    return out
