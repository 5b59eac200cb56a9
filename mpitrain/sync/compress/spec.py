"""`[sync.allreduce.compress]`: `kind` picks a registered compressor; the table's other
keys are that compressor's own options (its `Options`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...errors import UserError
from ...options import build, check, opt, to_dict
from .base import REGISTRY

KINDS = ("none", *REGISTRY)


def _options_of(kind: str):
    return REGISTRY[kind].Options() if kind != "none" else None


@dataclass(frozen=True, eq=False)
class Compress:
    """Gradient compression, per bucket inside the overlapped reduction: `kind` and that
    compressor's own keys, in this same table (listed below per kind). A key of another
    kind than the selected one is an error naming its kind."""

    kind: str = opt("none", choices=KINDS, help="none, or the compressor run on each bucket")

    def __post_init__(self):
        object.__setattr__(self, "options", _options_of(self.kind))  # defaults; of() sets others

    @classmethod
    def of(cls, kind: str, options=None) -> "Compress":
        spec = cls(kind)
        if options is not None:
            object.__setattr__(spec, "options", options)
        return spec

    @classmethod
    def from_table(cls, table: dict, where: str, prefix: str) -> "Compress":
        """Validate [prefix]: kind, then the keys against that kind's Options."""
        kind_field = dataclasses.fields(cls)[0]
        kind = check(where, f"{prefix}.kind", kind_field, str, table.get("kind", "none"))
        mine = {f.name for f in dataclasses.fields(REGISTRY[kind].Options)} if kind != "none" else set()
        for key in table:
            if key == "kind" or key in mine:
                continue
            owners = [n for n, c in REGISTRY.items() if key in {f.name for f in dataclasses.fields(c.Options)}]
            if owners:
                raise UserError(f"{where}: {prefix}.{key} is an option of kind {' / '.join(map(repr, owners))}, "
                                f"not of the selected kind {kind!r}")
            raise UserError(f"{where}: unknown key {prefix}.{key} (known: kind"
                            f"{''.join(', ' + k for k in sorted(mine))})")
        if kind == "none":
            return cls()
        rest = {k: v for k, v in table.items() if k != "kind"}
        return cls.of(kind, build(REGISTRY[kind].Options, rest, where, prefix))

    def to_table(self) -> dict:
        return {"kind": self.kind} | (to_dict(self.options) if self.options is not None else {})

    def __eq__(self, other):
        return isinstance(other, Compress) and (self.kind, self.options) == (other.kind, other.options)

    def __hash__(self):
        return hash((self.kind, self.options))

    def __repr__(self):
        return f"Compress(kind={self.kind!r}, options={self.options!r})"
