"""The configuration reference, generated from the options' own metadata.

`reference()` renders every section and key of a job file as Markdown — name, type,
default, allowed values / bounds and help — from `dataclasses.fields` and the `opt()`
metadata of the config dataclasses (config.py), of every registered strategy's `Options`
(sync.REGISTRY), of option tables nested in them (a field whose type is itself an options
dataclass) and of the compressors' `Options` where a compressor registry exists
(`mpitrain.sync.compress.REGISTRY`). docs/configuration.md holds it between MARKERS;
`write(path)` (`mpitrain config --keys --write docs/configuration.md`) regenerates that
block and leaves the prose around it alone; tests/cli/test_docs.py fails when the two
disagree. Nothing here calls MPI (importing the strategies imports mpi4py, which then
initialises as a singleton: no mpiexec needed).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import tomli_w

from .errors import UserError

BEGIN = "<!-- BEGIN generated: mpitrain config --keys -->"
END = "<!-- END generated -->"
REGENERATE = "mpitrain config --keys --write docs/configuration.md"


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "table"
    return {bool: "bool", int: "int", float: "float", str: "string", dict: "table"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _toml(value) -> str:
    """A value as it would be written in a job file (inline)."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    try:
        return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
    except TypeError:  # None or another value TOML cannot write
        return repr(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _allowed(meta) -> str:
    parts = []
    if meta.get("choices"):
        parts.append(", ".join(f"`{_toml(c)}`" for c in meta["choices"]))
    for key, sign in (("min", "≥"), ("gt", ">"), ("max", "≤"), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sign} {meta[key]}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _is_options(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _table(cls, prefix: str, seen: set, *, title: str = "", intro: str = "", empty: str = "(no keys)") -> list[str]:
    """`[prefix]`: one row per field of the options dataclass `cls`, then its nested tables.
    Adds what it renders (classes and prefixes) to `seen`."""
    seen.update((cls, prefix))
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: show it as written
        hints = {}
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, f.type)
        default = _default(f)
        if _is_options(hint) or dataclasses.is_dataclass(default) and not isinstance(default, type):
            nested.append((f"{prefix}.{f.name}", hint if _is_options(hint) else type(default),
                           f.metadata.get("help", "")))
            continue
        meta = f.metadata
        if hint is typing.Any and "help" not in meta:  # internal (e.g. a selected kind's options)
            continue
        rows.append((f.name, _type_name(hint), "" if default is dataclasses.MISSING else f"`{_toml(default)}`",
                     _allowed(meta), meta.get("help", "")))
    out = [f"### {title or f'`[{prefix}]`'}", ""]
    if intro:
        out += [" ".join(intro.split()), ""]
    doc = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""  # not dataclass's
    if doc:
        out += [" ".join(doc.split()), ""]
    if rows:
        out += ["| key | type | default | allowed | help |", "|---|---|---|---|---|", *_rows(rows), ""]
    elif not doc:
        out += [empty, ""]
    for sub_prefix, sub_cls, sub_help in nested:
        out += _table(sub_cls, sub_prefix, seen, intro=sub_help)
    if prefix.endswith(".compress"):  # the compressors' keys follow their table
        out += _compressor_tables(prefix, seen)
    return out


def _compressor_tables(prefix: str, seen: set) -> list[str]:
    """The keys each compressor `kind` adds to the compress table `[prefix]`."""
    out = []
    for name, cls in sorted(_compressors().items()):
        options = getattr(cls, "Options", None)
        if _is_options(options) and ("compressor", name) not in seen:
            seen.add(("compressor", name))
            out += _table(options, prefix, seen, title=f'`[{prefix}]` with `kind = "{name}"`',
                          empty="(no keys besides `kind`)")
    return out


def _compressors() -> dict:
    """The compressor registry, if the package has one (name -> class with `Options`)."""
    try:
        from .sync import compress
    except ImportError:
        return {}
    registry = getattr(compress, "REGISTRY", None)
    return dict(registry) if isinstance(registry, dict) else {}


def reference() -> str:
    """The Markdown reference of every section and key (what `mpitrain config --keys` prints)."""
    from . import config
    from .sync import REGISTRY

    out = ["<!-- generated from the options' opt(help=...) metadata; do not edit by hand: "
           f"run `{REGENERATE}` -->", ""]
    hints = typing.get_type_hints(config.Config)
    seen: set = set()
    for f in dataclasses.fields(config.Config):
        if f.name == "job_dir":
            continue
        if f.name == "sync":
            strategy = [("strategy", "string", f"`{_toml(config.SyncCfg().strategy)}`",
                         ", ".join(f"`{_toml(n)}`" for n in sorted(REGISTRY)),
                         "the strategy; its options are the table [sync.STRATEGY] below (tables of strategies "
                         "not selected are validated, then ignored)")]
            out += _sync_table(strategy)
            for name in sorted(REGISTRY):
                out += _table(REGISTRY[name].Options, f"sync.{name}", seen)
            out += _compressor_tables("sync.allreduce.compress", seen)  # if no nested table showed them
            continue
        out += _table(hints[f.name], f.name, seen)
    return "\n".join(out).rstrip("\n") + "\n"


def _rows(rows) -> list[str]:
    return ["| " + " | ".join([f"`{r[0]}`"] + [_cell(c) for c in r[1:]]) + " |" for r in rows]


def _sync_table(rows) -> list[str]:
    return ["### `[sync]`", "", "| key | type | default | allowed | help |", "|---|---|---|---|---|",
            *_rows(rows), ""]


def generated_block(text: str, where: str = "docs/configuration.md") -> tuple[int, int]:
    """(start, end) offsets of the generated content between the markers in `text`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise UserError(f"{where}: no generated block (a line {BEGIN!r}, then a line {END!r})")
    return start + len(BEGIN), end


def splice(text: str, block: str, where: str = "docs/configuration.md") -> str:
    """`text` with the generated block replaced by `block`."""
    start, end = generated_block(text, where)
    return text[:start] + "\n" + block + text[end:]


def write(path: str) -> str:
    """Regenerate the block between the markers of the Markdown file `path` (a one-line report)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    new = splice(text, reference(), path)
    if new == text:
        return f"{path}: the generated configuration reference is up to date\n"
    p.write_text(new)
    return f"{path}: regenerated the configuration reference\n"
