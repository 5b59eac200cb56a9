"""Job configuration: TOML files loaded into frozen dataclasses, validated field by field.

Every key has a type and, where it matters, a set of choices or a lower bound, so an
unknown key, a wrong type or a bad value becomes one `UserError` naming the file and the
key. `--set section.key=value` overrides are parsed as TOML values (bare words are taken
as strings).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .errors import UserError


def _opt(default, *, choices=None, min=None, gt=None, help=""):
    """A dataclass field with validation metadata."""
    return field(default=default, metadata={"choices": choices, "min": min, "gt": gt, "help": help})


@dataclass(frozen=True)
class ModelCfg:
    name: str = _opt("mlp", help="model registry key (see mpitrain.models)")
    hidden: tuple[int, ...] = _opt((128, 128), help="MLP hidden layer widths")
    channels: tuple[int, ...] = _opt((16, 32), help="CNN conv channels per block")
    dropout: float = _opt(0.0, min=0.0)


@dataclass(frozen=True)
class DataCfg:
    path: str = _opt("data/digits/digits.h5", help="HDF5 file (relative paths: from the CWD)")
    mode: str = _opt("partitioned", choices=("partitioned", "replicated"))
    train: str = _opt("train", help="HDF5 group of the training split")
    test: str = _opt("test", help="HDF5 group of the test split ('' = no evaluation)")
    x: str = _opt("x", help="dataset name of the inputs inside a split group")
    y: str = _opt("y", help="dataset name of the integer labels inside a split group")
    shuffle: str = _opt("auto", choices=("auto", "global", "shard", "none"),
                        help="auto = global when replicated, shard when partitioned")
    read_chunk: int = _opt(65536, gt=0, help="samples per collective HDF5 read")
    assign: str = _opt("static", choices=("static", "dynamic"),
                       help="dynamic: batches claimed first come, first served (async + replicated only)")


@dataclass(frozen=True)
class OptimCfg:
    name: str = _opt("sgd", help="sgd | adam | adamw")
    lr: float = _opt(0.1, gt=0.0)
    momentum: float = _opt(0.9, min=0.0)
    nesterov: bool = _opt(False)
    weight_decay: float = _opt(0.0, min=0.0)
    betas: tuple[float, ...] = _opt((0.9, 0.999))
    schedule: str = _opt("cosine", choices=("constant", "cosine", "step"))
    step_epochs: int = _opt(30, gt=0, help="schedule=step: decay every this many epochs")
    step_gamma: float = _opt(0.1, gt=0.0)
    warmup_epochs: float = _opt(0.0, min=0.0)
    lr_scaling: str = _opt("none", choices=("none", "linear"),
                           help="linear: lr x world size (Goyal et al. 2017)")


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = _opt(10, gt=0)
    batch_size: int = _opt(32, gt=0, help="samples per rank per step")
    max_steps: int = _opt(0, min=0, help="stop after this many steps (0 = no limit)")
    seed: int = _opt(0, min=0)
    threads: int = _opt(0, min=0, help="torch intra-op threads (0 = cores per node-local rank)")
    device: str = _opt("cpu", choices=("cpu", "cuda", "auto"))
    progress: bool = _opt(True, help="tqdm bar on rank 0")
    eval_every: int = _opt(1, gt=0, help="evaluate every this many epochs (and at the end)")
    watchdog_s: float = _opt(600.0, min=0.0, help="abort when a rank sees no progress this long (0 = off)")
    resume: str = _opt("auto", help="auto (newest valid checkpoint in the run folder), never, or a path")
    slowdown_rank: int = _opt(-1, min=-1, help="straggler injection: this rank sleeps (-1 = none)")
    slowdown_factor: float = _opt(1.0, min=1.0, help="... so its steps take factor x its compute time")


@dataclass(frozen=True)
class SyncCfg:
    strategy: str = _opt("allreduce", help="strategy registry key (see mpitrain.sync)")
    bucket_mb: float = _opt(25.0, gt=0.0)
    first_bucket_mb: float = _opt(1.0, gt=0.0, help="smaller first bucket starts comm early")
    staleness: int = _opt(3, min=0, help="ssp: how many clocks a worker may run ahead of the slowest")
    dc_lambda: float = _opt(0.0, min=0.0, help="async: DC-ASGD delay compensation (0 = off; paper: 0.04)")
    period: int = _opt(4, gt=0, help="local_sgd / post_local_sgd / bmuf / easgd: steps between synchronisations")
    local_start: int = _opt(100, min=0, help="post_local_sgd: synchronous steps before local SGD")
    bmuf_momentum: float = _opt(-1.0, min=-1.0, help="bmuf block momentum η (-1 = 1 - 1/N)")
    bmuf_lr: float = _opt(1.0, gt=0.0, help="bmuf block learning rate ζ")
    bmuf_nesterov: bool = _opt(True, help="bmuf: restart from W_g + ηΔ (Nesterov) or W_g")
    easgd_beta: float = _opt(0.9, gt=0.0, help="easgd: center moving rate x p")
    easgd_alpha: float = _opt(0.0, min=0.0, help="easgd: worker moving rate (0 = β/p)")
    servers: int = _opt(0, min=0, help="dedicated parameter-server ranks (0 = shards on every rank)")
    timeout_s: float = _opt(0.0, min=0.0, help="give up waiting for the store after this long (0 = never)")
    overlap: str = _opt("auto", choices=("auto", "thread", "nonblocking", "none"),
                        help="thread: blocking Allreduce per bucket on a comm thread; auto: thread "
                             "when each rank has >= 2 cores, else none (see README benchmarks)")


@dataclass(frozen=True)
class CommCfg:
    cuda_path: str = _opt("auto", choices=("auto", "direct", "staged"))


@dataclass(frozen=True)
class OutputCfg:
    dir: str = _opt("runs/{name}", help="run folder; {name} = output.name")
    name: str = _opt("", help="run name (default: the job file's stem)")
    checkpoint_every: int = _opt(500, min=0, help="steps between checkpoints (0 = only at the end / on stop)")
    keep: int = _opt(2, gt=0, help="newest checkpoints to keep")


@dataclass(frozen=True)
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    sync: SyncCfg = field(default_factory=SyncCfg)
    comm: CommCfg = field(default_factory=CommCfg)
    output: OutputCfg = field(default_factory=OutputCfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.output.name))

    def to_dict(self) -> dict:
        return {s.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
                for s in dataclasses.fields(self)}

    def dumps(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _check(where: str, key: str, f: dataclasses.Field, hint, value):
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
    elif hint is str:
        if not isinstance(value, str):
            bad("a string")
    elif origin is tuple:
        (elem, *_rest) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            bad(f"a list of {elem.__name__}s")
        value = tuple(_check(where, f"{key}[{i}]", f, elem, v) for i, v in enumerate(value))
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        bad("one of " + ", ".join(map(repr, meta["choices"])))
    if meta.get("min") is not None and value < meta["min"]:
        bad(f"a value >= {meta['min']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        bad(f"a value > {meta['gt']}")
    return value


def _parse_override(item: str) -> tuple[str, str, object]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UserError(f"--set {item!r}: expected section.key=value")
    lhs, raw = item.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return section, key, value


def from_dict(raw: dict, where: str = "<config>") -> Config:
    """Validate a nested dict (as read from TOML) into a Config."""
    sections = {}
    hints = typing.get_type_hints(Config)
    for name, table in raw.items():
        if name not in hints:
            raise UserError(f"{where}: unknown section [{name}] (known: {', '.join(hints)})")
        if not isinstance(table, dict):
            raise UserError(f"{where}: {name}: expected a table [{name}]")
        cls = hints[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        fhints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in table.items():
            if key not in fields:
                raise UserError(f"{where}: unknown key {name}.{key} (known: {', '.join(fields)})")
            kwargs[key] = _check(where, f"{name}.{key}", fields[key], fhints[key], value)
        sections[name] = cls(**kwargs)
    return Config(**sections)


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a job file (or only defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{where}: no such job file") from None
        except OSError as e:
            raise UserError(f"{where}: cannot read job file: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{where}: malformed TOML: {e}") from None
    for item in overrides:
        section, key, value = _parse_override(item)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise UserError(f"--set {item!r}: {section} is not a table")
        raw[section][key] = value
    if not raw.get("output", {}).get("name"):
        raw.setdefault("output", {})["name"] = Path(path).stem if path else "run"
    where = where + (" (with --set)" if overrides else "")
    return from_dict(raw, where)
