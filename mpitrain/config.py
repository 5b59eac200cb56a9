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
from .options import build, opt as _opt, to_dict


@dataclass(frozen=True)
class ModelCfg:
    name: str = _opt("mlp", help="a built-in model: mlp | cnn | resnet | gpt (used when factory is empty)")
    factory: str = _opt("", help="your model: 'package.module:function' (importable from the job file's "
                                 "folder or PYTHONPATH), called with [model.args] + input_shape, num_classes")
    args: dict = _opt({}, help="keyword arguments for the factory")
    hidden: tuple[int, ...] = _opt((128, 128), help="mlp: hidden layer widths")
    channels: tuple[int, ...] = _opt((16, 32), help="cnn: conv channels per block")
    dropout: float = _opt(0.0, min=0.0, lt=1.0, help="mlp, cnn, gpt: dropout probability")


@dataclass(frozen=True)
class DataCfg:
    path: str = _opt("data/digits/digits.h5", help="HDF5 file (relative paths: from the CWD)")
    mode: str = _opt("partitioned", choices=("partitioned", "replicated"))
    train: str = _opt("train", help="HDF5 group of the training split")
    test: str = _opt("test", help="HDF5 group of the test split ('' = no evaluation)")
    x: str = _opt("x", help="dataset name of the inputs inside a split group")
    y: str = _opt("y", help="dataset name of the targets inside a split group (integer labels or floats)")
    shuffle: str = _opt("auto", choices=("auto", "global", "shard", "none"),
                        help="auto = global when replicated, shard when partitioned")
    read_chunk: int = _opt(65536, gt=0, max=2**31 - 1, help="samples (tokens) per collective HDF5 read")
    seq_len: int = _opt(0, min=0, max=2**20, help="token streams: tokens per sample (window); required there")
    window_offset: str = _opt("random", choices=("random", "fixed"),
                              help="token streams: random = each epoch's training windows start at a new seeded "
                                   "offset in [0, seq_len) (every token a target once per epoch); fixed = the "
                                   "same windows every epoch")
    check_finite: bool = _opt(True, help="reject NaN/inf inputs when loading (one pass over the data)")
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
    step_epochs: int = _opt(30, gt=0, max=10**6, help="schedule=step: decay every this many epochs")
    step_gamma: float = _opt(0.1, gt=0.0)
    warmup_epochs: float = _opt(0.0, min=0.0)
    clip_norm: float = _opt(0.0, min=0.0, help="clip the reduced gradients' global norm (0 = off)")
    lr_scaling: str = _opt("none", choices=("none", "linear"),
                           help="linear: lr x world size (Goyal et al. 2017)")


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = _opt(10, gt=0, max=10**6)
    batch_size: int = _opt(32, gt=0, max=2**24, help="samples per rank per step")
    max_steps: int = _opt(0, min=0, help="stop after this many steps (0 = no limit)")
    seed: int = _opt(0, min=0, max=2**32 - 1)
    threads: int = _opt(0, min=0, max=4096, help="torch intra-op threads (0 = cores per node-local rank)")
    device: str = _opt("cpu", choices=("cpu", "cuda", "auto"))
    progress: bool = _opt(True, help="tqdm bar on rank 0")
    eval_every: int = _opt(1, gt=0, help="evaluate every this many epochs (and at the end)")
    watchdog_s: float = _opt(600.0, min=0.0, help="abort when a rank sees no progress this long (0 = off)")
    loss: str = _opt("auto", help="auto (cross_entropy for labels and tokens, mse for float targets) | "
                                 "cross_entropy | mse | 'package.module:function'(output, target) -> "
                                 "per-sample losses")
    accumulate: int = _opt(1, gt=0, max=4096, help="micro-batches per optimizer step (reduced after the last)")
    precision: str = _opt("fp32", choices=("fp32", "bf16", "fp16"),
                          help="autocast of forward and loss (bf16: CPU and CUDA; fp16: CUDA, with a loss scaler "
                               "agreed over ranks); weights and gradients stay fp32")
    trace: bool = _opt(False, help="write RUN_DIR/trace.json: a Chrome/Perfetto timeline of every rank")
    on_nonfinite: str = _opt("stop", choices=("stop", "skip"),
                             help="a NaN/inf loss on any rank: stop (exit 4, nothing of that step applied) "
                                  "or skip that step's update on every rank")
    max_skipped: int = _opt(10, min=0, max=10**6,
                            help="on_nonfinite = 'skip': stop (exit 4) after this many consecutive skipped "
                                 "steps (0 = never)")
    resume: str = _opt("auto", help="auto (newest valid checkpoint in the run folder), never, or a path")
    slowdown_rank: int = _opt(-1, min=-1, help="straggler injection: this rank sleeps (-1 = none)")
    slowdown_factor: float = _opt(1.0, min=1.0, help="... so its steps take factor x its compute time")


@dataclass(frozen=True)
class SyncCfg:
    """`strategy` picks a registered strategy; its options come from the `[sync.<strategy>]`
    table, validated by that strategy's own `Options` dataclass. Tables for strategies
    that are not selected are validated too, then ignored, so one job file can carry the
    options of several strategies and switch with `--set sync.strategy=NAME`."""

    strategy: str = "allreduce"
    options: typing.Any = None  # the selected strategy's Options instance

    def __post_init__(self):
        if self.options is None:
            object.__setattr__(self, "options", _strategy_class(self.strategy, "<defaults>").Options())


PIPELINE_STRATEGIES = ("allreduce", "zero")  # data-parallel strategies that run inside each pipeline stage
PIPELINE_COMPRESS = ("none", "fp16", "bf16")  # their compressors with no per-stage state to checkpoint (yet)


@dataclass(frozen=True)
class ParallelCfg:
    pipeline_stages: int = _opt(1, min=1, help="P: the model's blocks split into P pipeline stages over "
                                               "consecutive ranks (D = ranks / P data-parallel replicas)")
    micro_batches: int = _opt(1, min=1, help="m: micro-batches per step through the pipeline (bubble "
                                             "(P-1)/(m+P-1)); each rank's batch is split into m")
    schedule: str = _opt("1f1b", choices=("1f1b", "gpipe"),
                         help="1f1b holds at most P - stage micro-batches of activations, gpipe all m")
    split: tuple[int, ...] = _opt((), help="blocks per stage by hand, e.g. [2, 3] (empty: balanced by "
                                           "each block's measured forward + backward time)")
    tensor: int = _opt(1, min=1, help="T: the built-in gpt's heads, MLP width and vocabulary split over T "
                                      "consecutive ranks (tensor parallelism; D = ranks / T replicas)")


@dataclass(frozen=True)
class OutputCfg:
    dir: str = _opt("runs/{name}", help="run folder; {name} = output.name")
    name: str = _opt("", help="run name (default: the job file's stem)")
    checkpoint_every: int = _opt(500, min=0, help="steps between checkpoints (0 = only at the end / on stop)")
    keep: int = _opt(2, gt=0, max=10**4, help="newest checkpoints to keep")
    tensorboard: bool = _opt(False, help="also write the metrics rows as TensorBoard event files in "
                                         "RUN_DIR/tensorboard")


@dataclass(frozen=True)
class Config:
    """A validated job. `job_dir` (not part of the saved config) is the job file's folder,
    where model factories and losses are imported from first."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    sync: SyncCfg = field(default_factory=SyncCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    output: OutputCfg = field(default_factory=OutputCfg)
    job_dir: str = field(default="", compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.output.name))

    def to_dict(self) -> dict:
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("sync", "job_dir")}
        out["sync"] = {"strategy": self.sync.strategy, self.sync.strategy: to_dict(self.sync.options)}
        return out

    def dumps(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UserError(f"--set {item!r}: expected section.key=value (or sync.STRATEGY.key=value)")
    lhs, raw = item.split("=", 1)
    path = [p.strip() for p in lhs.split(".")]
    if not all(path):
        raise UserError(f"--set {item!r}: empty name in {lhs!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return path, value


# keys that moved into a strategy's own table ({s} = the selected strategy)
MOVED = {
    "sync.bucket_mb": "sync.allreduce.bucket_mb", "sync.first_bucket_mb": "sync.allreduce.first_bucket_mb",
    "sync.overlap": "sync.allreduce.overlap", "comm.cuda_path": "sync.allreduce.cuda_path",
    "sync.staleness": "sync.ssp.staleness", "sync.dc_lambda": "sync.async.dc_lambda",
    "sync.local_start": "sync.post_local_sgd.local_start", "sync.bmuf_momentum": "sync.bmuf.momentum",
    "sync.bmuf_lr": "sync.bmuf.lr", "sync.bmuf_nesterov": "sync.bmuf.nesterov",
    "sync.easgd_beta": "sync.easgd.beta", "sync.easgd_alpha": "sync.easgd.alpha",
    "sync.period": "sync.{s}.period", "sync.servers": "sync.{s}.servers", "sync.timeout_s": "sync.{s}.timeout_s",
}
# keys inside a strategy's table that moved into a nested table
MOVED_IN = {
    "sync.allreduce.topk_ratio": "sync.allreduce.compress.ratio",
    "sync.allreduce.powersgd_rank": "sync.allreduce.compress.rank",
    "sync.allreduce.powersgd_start_step": "sync.allreduce.compress.start_step",
    "sync.allreduce.powersgd_min_numel": "sync.allreduce.compress.min_numel",
}


def _moved(where: str, old: str, new: str, value="...") -> UserError:
    """The one line for a key that moved: where to write it now."""
    return UserError(f"{where}: {old} is now {new} (write it in a [{new.rsplit('.', 1)[0]}] table, "
                     f"or --set {new}={value})")


def _moved_in(name: str, table, where: str) -> None:
    """Old keys of the strategy table [sync.name]: one line naming the new key."""
    if not isinstance(table, dict):
        return
    for key, value in table.items():
        old = f"sync.{name}.{key}"
        if old in MOVED_IN:
            raise _moved(where, old, MOVED_IN[old])
        if old == "sync.allreduce.compress" and isinstance(value, str):  # compress = "fp16"
            raise _moved(where, f"{old} = {value!r}", f"{old}.kind", value)


def _strategy_class(name, where):
    from .sync import REGISTRY

    if not isinstance(name, str):
        raise UserError(f"{where}: sync.strategy: expected a string, got {name!r}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"{where}: sync.strategy: unknown strategy {name!r} "
                        f"(known: {', '.join(sorted(REGISTRY))})") from None


def _sync_section(table: dict, where: str) -> SyncCfg:
    from .sync import REGISTRY

    if not isinstance(table, dict):
        raise UserError(f"{where}: sync: expected a table [sync]")
    name = table.get("strategy", "allreduce")
    cls = _strategy_class(name, where)
    for key, value in table.items():
        if key == "strategy":
            continue
        if f"sync.{key}" in MOVED:
            new = MOVED[f"sync.{key}"].format(s=name)
            has = sorted(n for n, c in REGISTRY.items() if key in {f.name for f in dataclasses.fields(c.Options)})
            if "{s}" in MOVED[f"sync.{key}"] and name not in has:
                raise UserError(f"{where}: sync.{key} is now sync.STRATEGY.{key} for {', '.join(has)} "
                                f"({name} takes no {key})")
            raise _moved(where, f"sync.{key}", new)
        if key not in REGISTRY:
            raise UserError(f"{where}: unknown key sync.{key} (sync takes strategy and one table per "
                            f"strategy: {', '.join(sorted(REGISTRY))})")
        _moved_in(key, value, where)
        build(REGISTRY[key].Options, value, where, f"sync.{key}")  # validated even if not selected
    return SyncCfg(name, build(cls.Options, table.get(name, {}), where, f"sync.{name}"))


def from_dict(raw: dict, where: str = "<config>") -> Config:
    """Validate a nested dict (as read from TOML) into a Config."""
    sections = {}
    hints = typing.get_type_hints(Config)
    for name, table in raw.items():
        if name == "comm":
            raise UserError(f"{where}: [comm] cuda_path is now sync.allreduce.cuda_path")
        if name not in hints:
            raise UserError(f"{where}: unknown section [{name}] (known: {', '.join(hints)})")
        if name == "job_dir":
            raise UserError(f"{where}: unknown section [{name}] (known: {', '.join(hints)})")
        if name == "sync":
            sections[name] = _sync_section(table, where)
        else:
            sections[name] = build(hints[name], table, where, name)
    cfg = Config(**sections)
    _cross_checks(cfg, where)
    return cfg


def _cross_checks(cfg: Config, where: str) -> None:
    """Checks that involve several sections (before any collective)."""
    from .sync import REGISTRY

    try:
        cfg.run_dir
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{where}: output.dir: {cfg.output.dir!r} is not a valid folder pattern "
                        f"(only {{name}} is replaced): {e!r}") from None
    d = cfg.data
    if d.assign == "dynamic":
        if not REGISTRY[cfg.sync.strategy].uneven_steps:
            able = ", ".join(n for n, c in sorted(REGISTRY.items()) if c.uneven_steps)
            raise UserError(f"{where}: data.assign = 'dynamic' needs a strategy that lets ranks run "
                            f"different numbers of steps ({able}), not {cfg.sync.strategy!r}")
        if d.mode != "replicated":
            raise UserError(f"{where}: data.assign = 'dynamic' needs data.mode = 'replicated' "
                            "(any rank may take any batch)")
    if cfg.train.precision == "fp16":
        if cfg.train.device == "cpu":
            raise UserError(f"{where}: train.precision = 'fp16' needs train.device = 'cuda' (a loss scaler on GPUs); "
                            "on CPUs use 'bf16'")
        if REGISTRY[cfg.sync.strategy].remote_update:
            raise UserError(f"{where}: train.precision = 'fp16': {cfg.sync.strategy!r} applies the update in the "
                            "parameter store, which cannot unscale fp16 gradients; use 'bf16' there")
    if cfg.train.device == "cuda" and REGISTRY[cfg.sync.strategy].remote_update:
        raise UserError(f"{where}: sync.strategy = {cfg.sync.strategy!r} keeps the parameters in host RMA windows: "
                        "set train.device = 'cpu'")
    if cfg.optim.clip_norm and REGISTRY[cfg.sync.strategy].remote_update:
        raise UserError(f"{where}: optim.clip_norm: {cfg.sync.strategy!r} applies the update in the parameter "
                        "store, where there is no reduced gradient to clip; use allreduce or a local strategy")
    pp = cfg.parallel
    if pp.pipeline_stages > 1:
        if cfg.sync.strategy not in PIPELINE_STRATEGIES:
            raise UserError(f"{where}: parallel.pipeline_stages = {pp.pipeline_stages}: each stage's replicas "
                            f"average gradients with {' or '.join(PIPELINE_STRATEGIES)}, not sync.strategy = "
                            f"{cfg.sync.strategy!r}")
        kind = cfg.sync.options.compress.kind
        if kind not in PIPELINE_COMPRESS:
            raise UserError(f"{where}: parallel.pipeline_stages = {pp.pipeline_stages} with "
                            f"sync.{cfg.sync.strategy}.compress.kind = {kind!r}: not yet (its state is per stage); "
                            f"use {', '.join(PIPELINE_COMPRESS)}")
        if cfg.train.accumulate != 1:
            raise UserError(f"{where}: train.accumulate = {cfg.train.accumulate} with parallel.pipeline_stages: "
                            "the pipeline's micro-batches are the accumulation (parallel.micro_batches)")
        if d.mode != "replicated" or d.assign == "dynamic":
            raise UserError(f"{where}: parallel.pipeline_stages = {pp.pipeline_stages} needs data.mode = "
                            "'replicated' (every stage of a replica reads the same batch)")
        if pp.micro_batches > cfg.train.batch_size:
            raise UserError(f"{where}: parallel.micro_batches = {pp.micro_batches} is more than the "
                            f"{cfg.train.batch_size} samples of a replica's batch (train.batch_size)")
    elif pp.split:
        raise UserError(f"{where}: parallel.split = {list(pp.split)} without parallel.pipeline_stages > 1")
    if pp.tensor > 1:
        if pp.pipeline_stages > 1:
            raise UserError(f"{where}: parallel.tensor with parallel.pipeline_stages: not yet (the 3-D grid); "
                            "use one of them")
        if cfg.model.factory or cfg.model.name != "gpt":
            raise UserError(f"{where}: parallel.tensor = {pp.tensor}: the model needs tensor-parallel layers; "
                            f"the built-in gpt has them (model.name = 'gpt'), {cfg.model.factory or cfg.model.name!r} "
                            "does not")
        if cfg.sync.strategy != "allreduce" or cfg.sync.options.compress.kind not in PIPELINE_COMPRESS:
            raise UserError(f"{where}: parallel.tensor = {pp.tensor}: the replicas average gradients with "
                            f"sync.strategy = 'allreduce' (compress.kind {', '.join(PIPELINE_COMPRESS)}); not yet "
                            f"{cfg.sync.strategy!r}" + (f" with {cfg.sync.options.compress.kind!r}"
                                                        if cfg.sync.strategy == "allreduce" else ""))
        if d.mode != "replicated" or d.assign == "dynamic":
            raise UserError(f"{where}: parallel.tensor = {pp.tensor} needs data.mode = 'replicated' (the tensor "
                            "ranks of a replica read the same batch)")
    if d.shuffle == "global" and d.mode == "partitioned":
        raise UserError(f"{where}: data.shuffle = 'global' needs data.mode = 'replicated' "
                        "(partitioned ranks hold only their shard; use 'shard')")


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
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte {e.start}): a job file is TOML") from None
    for item in overrides:
        keys, value = _parse_override(item)
        table = raw
        for i, name in enumerate(keys[:-1]):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {item!r}: {'.'.join(keys[:i + 1])} is not a table")
        table[keys[-1]] = value
    if not raw.get("output", {}).get("name"):
        raw.setdefault("output", {})["name"] = Path(path).stem if path else "run"
    where = where + (" (with --set)" if overrides else "")
    cfg = from_dict(raw, where)
    return dataclasses.replace(cfg, job_dir=str(Path(path).resolve().parent)) if path else cfg
