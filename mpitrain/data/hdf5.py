"""Parallel-HDF5 splits: each rank reads its shard (partitioned) or everything (replicated).

Two layouts. Samples: `GROUP/x` (N, ...) with `GROUP/y` integer labels (N,) (classification)
or float targets (N,) / (N, k) (regression). Token streams: `GROUP/tokens` (T,) integer ids
with a file attribute `vocab_size` (next-token language modelling); sample i is the window
of tokens [s + i*L, s + i*L + L + 1) for L = data.seq_len, so an epoch covers the stream
once; s = 0 for the test split, and for the training split a shift drawn per epoch from
the seed (data.window_offset = "random": each epoch's windows differ, every token of
[s, s + n*L) is a target once) or 0 ("fixed").

Reads are collective (`driver="mpio"`, `dset.collective`), in chunks of `read_chunk`
samples (tokens), and every rank issues the same number of reads. Shapes, dtypes and label
or token ranges are validated on load; any problem becomes one UserError agreed on by all
ranks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..comm import heartbeat
from ..errors import AgreedError, UserError


@dataclass
class Split:
    """The rows [offset, offset + len(x)) of a split that this rank holds."""

    x: np.ndarray
    y: np.ndarray
    offset: int
    total: int  # rows in the whole split

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = idx - self.offset
        return self.x[local], self.y[local]


@dataclass
class TokenSplit:
    """Windows of a token stream: sample i is tokens [s + i*L, s + i*L + L + 1) (inputs: the
    first L, targets: the last L) for the epoch's shift s (0 <= s < `shifts`; `set_epoch`).
    This rank holds the tokens of windows [offset, offset + n), i.e. its contiguous token
    range plus `shifts` tokens of overlap."""

    tokens: np.ndarray  # int64
    offset: int  # first window held
    total: int  # windows in the whole split
    seq_len: int
    shifts: int = 1  # 1: the same windows every epoch; seq_len: a new offset per epoch
    seed: int = 0
    shift: int = 0  # this epoch's

    def set_epoch(self, epoch: int) -> int:
        """This epoch's windows: a shift drawn from (seed, epoch), the same on every rank."""
        self.shift = int(np.random.default_rng([self.seed, epoch, 7]).integers(self.shifts)) if self.shifts > 1 else 0
        return self.shift

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = (np.asarray(idx, dtype=np.int64) - self.offset) * self.seq_len + self.shift
        w = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return w[:, :-1], w[:, 1:]


TASKS = ("classify", "regress", "lm")


@dataclass(frozen=True)
class Meta:
    """What the data says about the model: one sample's shape and the task's output size."""

    input_shape: tuple[int, ...]
    num_classes: int = 0  # classify
    task: str = "classify"  # classify | regress | lm
    num_outputs: int = 0  # regress: target width (1 for (N,) targets)
    vocab_size: int = 0  # lm
    level: str = ""  # lm: "char" or "byte" (mpitrain data text)
    vocab: str = ""  # lm, char level: the characters, a token being an index into it

    def factory_kwargs(self) -> dict:
        """What a model factory is called with besides [model.args]."""
        size = {"classify": ("num_classes", self.num_classes), "regress": ("num_outputs", self.num_outputs),
                "lm": ("vocab_size", self.vocab_size)}[self.task]
        return {"input_shape": self.input_shape, size[0]: size[1]}


def _read_rows(dset, lo: int, hi: int, n_reads: int, collective: bool) -> np.ndarray:
    """Read rows [lo, hi) in n_reads pieces (the same count on every rank)."""
    pieces = np.array_split(np.arange(lo, hi), n_reads)
    out = np.empty((hi - lo,) + dset.shape[1:], dtype=dset.dtype)
    pos = 0
    for p in pieces:
        heartbeat.tick()
        a, b = (int(p[0]), int(p[-1]) + 1) if len(p) else (lo, lo)
        if collective:
            with dset.collective:
                out[pos:pos + b - a] = dset[a:b]
        else:
            out[pos:pos + b - a] = dset[a:b]
        pos += b - a
    return out


def _split_datasets(f: h5py.File, path: str, group: str, xname: str, yname: str):
    where = f"{path}: {group}/"
    for name in (xname, yname):
        if f"{group}/{name}" not in f:
            have = ", ".join(sorted(f[group].keys())) if group in f and isinstance(f[group], h5py.Group) \
                else ", ".join(sorted(f.keys()))
            raise UserError(f"{where}{name}: no such dataset (found: {have or 'nothing'}); "
                            f"set data.x / data.y / data.{'train' if group else 'test'}")
    x, y = f[f"{group}/{xname}"], f[f"{group}/{yname}"]
    if not isinstance(x, h5py.Dataset) or not isinstance(y, h5py.Dataset):
        raise UserError(f"{where}: {xname} and {yname} must be datasets")
    if x.dtype.kind not in "fiu":
        raise UserError(f"{where}{xname}: inputs must be numeric, got dtype {x.dtype}")
    if y.dtype.kind not in "iuf":
        raise UserError(f"{where}{yname}: targets must be integer labels or float values, got dtype {y.dtype}")
    if y.dtype.kind in "iu" and y.ndim != 1:
        raise UserError(f"{where}{yname}: integer labels must be 1-D, got shape {y.shape}")
    if y.ndim not in (1, 2):
        raise UserError(f"{where}{yname}: float targets must be (N,) or (N, k), got shape {y.shape}")
    if x.ndim < 2:
        raise UserError(f"{where}{xname}: inputs must be (samples, features...), got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{where}: {xname} has {x.shape[0]} rows but {yname} has {y.shape[0]}")
    if x.shape[0] == 0:
        raise UserError(f"{where}{xname}: empty split (0 samples)")
    return x, y


def load(cfg, world, replicate_test: bool = False) -> tuple[Split | TokenSplit, Split | TokenSplit | None, Meta]:
    """Collective: open cfg.path and read the train (and test) split for this rank
    (`replicate_test`: the whole test split on every rank, for pipelines, whose stages
    evaluate the same samples)."""
    path = cfg.path
    # agree on the cheap checks before the collective open (a missing file must not hang)
    def precheck():
        if not os.path.exists(path):
            raise UserError(f"{path}: data file not found (for digits run: mpitrain data digits)")
        if not os.access(path, os.R_OK):
            raise UserError(f"{path}: data file not readable")
        if not h5py.is_hdf5(path):
            raise UserError(f"{path}: not an HDF5 file")
    world.agree(precheck)
    try:
        f = h5py.File(path, "r", driver="mpio", comm=world.comm)
    except OSError as e:
        raise AgreedError(f"{path}: cannot open HDF5 file: {e}") from None
    try:
        splits, meta = world.agree(_load_open, f, cfg, world, replicate_test)
    finally:
        f.close()
    if meta.task == "classify":
        meta = _check_labels(path, splits, meta, world)
    elif meta.task == "lm":
        _check_tokens(path, splits, meta, world)
    return splits[0], (splits[1] if len(splits) > 1 else None), meta


def _check_labels(path, splits, meta, world) -> Meta:
    """Collective: the agreed label range, and so the number of classes."""
    lo = min((int(s.y.min()) for s in splits if len(s.y)), default=0)
    hi = max((int(s.y.max()) for s in splits if len(s.y)), default=0)
    lo, hi = world.min(lo), world.max(hi)
    num_classes = meta.num_classes or hi + 1
    if num_classes > MAX_CLASSES:
        raise AgreedError(f"{path}: labels up to {hi} mean {hi + 1} classes (at most {MAX_CLASSES}); "
                          "labels must be class indices 0..C-1")
    if lo < 0 or hi >= num_classes:
        raise AgreedError(f"{path}: labels must lie in [0, {num_classes}), found [{lo}, {hi}]")
    if num_classes < 2:
        raise AgreedError(f"{path}: need at least 2 classes, found {num_classes}")
    return Meta(meta.input_shape, num_classes)


def _check_tokens(path, splits, meta, world) -> None:
    """Collective: every token id is in [0, vocab_size)."""
    lo = world.min(min((int(s.tokens.min()) for s in splits if len(s.tokens)), default=0))
    hi = world.max(max((int(s.tokens.max()) for s in splits if len(s.tokens)), default=0))
    if lo < 0 or hi >= meta.vocab_size:
        raise AgreedError(f"{path}: token ids must lie in [0, vocab_size = {meta.vocab_size}), found [{lo}, {hi}]")


def _load_open(f, cfg, world, replicate_test: bool = False):
    groups = [(cfg.train, "train")] + ([(cfg.test, "test")] if cfg.test else [])
    for g, key in groups:
        if g not in f:
            raise UserError(f"{cfg.path}: no group {g!r} (data.{key}); found: {', '.join(sorted(f.keys()))}")
    if isinstance(f[cfg.train], h5py.Group) and "tokens" in f[cfg.train] and cfg.x not in f[cfg.train]:
        return _load_tokens(f, cfg, world, [g for g, _ in groups], replicate_test)
    if cfg.seq_len:
        raise UserError(f"{cfg.path}: data.seq_len applies to token streams ({cfg.train}/tokens); "
                        f"this file has {cfg.train}/{cfg.x}: remove data.seq_len")
    train_x, train_y = _split_datasets(f, cfg.path, cfg.train, cfg.x, cfg.y)
    test_ds = _split_datasets(f, cfg.path, cfg.test, cfg.x, cfg.y) if len(groups) > 1 else None
    if test_ds and test_ds[0].shape[1:] != train_x.shape[1:]:
        raise UserError(f"{cfg.path}: test inputs have shape {test_ds[0].shape[1:]}, train {train_x.shape[1:]}")
    if test_ds and (test_ds[1].dtype.kind == "f") != (train_y.dtype.kind == "f") \
            or test_ds and train_y.dtype.kind == "f" and test_ds[1].shape[1:] != train_y.shape[1:]:
        raise UserError(f"{cfg.path}: test targets ({test_ds[1].dtype} {test_ds[1].shape[1:]}) do not match "
                        f"train targets ({train_y.dtype} {train_y.shape[1:]})")
    n = train_x.shape[0]
    if cfg.mode == "partitioned" and n < world.size:
        raise UserError(f"{cfg.path}: {n} training samples cannot be partitioned over {world.size} ranks")
    splits = [_read_split(train_x, train_y, cfg, world, replicated=cfg.mode == "replicated")]
    if test_ds:
        splits.append(_read_split(*test_ds, cfg, world, replicated=replicate_test))
    shape = tuple(train_x.shape[1:])
    if train_y.dtype.kind == "f":
        return splits, Meta(shape, task="regress", num_outputs=int(train_y.shape[1]) if train_y.ndim == 2 else 1)
    return splits, Meta(shape, _num_classes(f, cfg.path) or 0)


MAX_VOCAB = 2**24


def _load_tokens(f, cfg, world, groups, replicate_test: bool = False):
    """The token-stream layout: GROUP/tokens, file attribute vocab_size."""
    raw = f.attrs.get("vocab_size")
    v = np.asarray(raw) if raw is not None else None
    if v is None or v.ndim != 0 or v.dtype.kind not in "iu" or not 2 <= int(v) <= MAX_VOCAB:
        raise UserError(f"{cfg.path}: token data needs a file attribute vocab_size, an integer in [2, {MAX_VOCAB}]"
                        f", got {raw!r}")
    if not cfg.seq_len:
        raise UserError(f"{cfg.path}: token-stream data: set data.seq_len (tokens per sample, e.g. 64)")
    splits = []
    for g in groups:
        d = f[g].get("tokens")
        if not isinstance(d, h5py.Dataset) or d.ndim != 1 or d.dtype.kind not in "iu":
            raise UserError(f"{cfg.path}: {g}/tokens must be a 1-D integer dataset, got "
                            f"{getattr(d, 'dtype', type(d).__name__)} {getattr(d, 'shape', '')}")
        replicated = (cfg.mode == "replicated") if g == cfg.train else replicate_test
        # training windows at a new offset each epoch: room for a shift of up to seq_len - 1
        shifts = cfg.seq_len if g == cfg.train and cfg.window_offset == "random" else 1
        windows = (d.shape[0] - shifts) // cfg.seq_len
        if windows < (1 if replicated else world.size):
            raise UserError(f"{cfg.path}: {g}/tokens has {d.shape[0]} tokens: {windows} windows of data.seq_len = "
                            f"{cfg.seq_len} (+1), fewer than the {1 if replicated else world.size} "
                            f"{'needed' if replicated else 'ranks'}; use a smaller data.seq_len")
        lo, hi = (0, windows) if replicated else world.shard(windows)
        span = windows if replicated else math.ceil(windows / world.size)
        n_reads = max(1, math.ceil(span * cfg.seq_len / cfg.read_chunk))
        collective = (windows // world.size if not replicated else windows) * cfg.seq_len >= n_reads
        tokens = _read_rows(d, lo * cfg.seq_len, hi * cfg.seq_len + shifts, n_reads, collective).astype(np.int64)
        splits.append(TokenSplit(tokens, lo, windows, cfg.seq_len, shifts))
    level, vocab = f.attrs.get("level", ""), f.attrs.get("vocab", "")
    level, vocab = (x.decode() if isinstance(x, bytes) else str(x) for x in (level, vocab))
    return splits, Meta((cfg.seq_len,), task="lm", vocab_size=int(v), level=level, vocab=vocab)


MAX_CLASSES = 2**20


def _num_classes(f, path) -> int | None:
    """The file's num_classes attribute (optional), checked."""
    raw = f.attrs.get("num_classes")
    if raw is None:
        return None
    v = np.asarray(raw)
    if v.ndim != 0 or v.dtype.kind not in "iu" or not 2 <= int(v) <= MAX_CLASSES:
        raise UserError(f"{path}: attribute num_classes must be an integer in [2, {MAX_CLASSES}], got {raw!r}")
    return int(v)


def _read_split(x, y, cfg, world, replicated: bool) -> Split:
    n = x.shape[0]
    lo, hi = (0, n) if replicated else world.shard(n)
    span = n if replicated else math.ceil(n / world.size)
    n_reads = max(1, math.ceil(span / cfg.read_chunk))
    # an empty piece would make h5py skip the collective H5Dread on that rank: fall back
    collective = (n // world.size if not replicated else n) >= n_reads
    xs = _read_rows(x, lo, hi, n_reads, collective)
    ys = _read_rows(y, lo, hi, n_reads, collective)
    ys = ys.astype(np.float32 if y.dtype.kind == "f" else np.int64, copy=False)
    xs = xs.astype(np.float32, copy=False)
    scale = x.attrs.get("scale")
    if scale is not None:  # e.g. uint8 pixels stored with scale 1/255
        if np.ndim(scale) or not np.issubdtype(np.asarray(scale).dtype, np.number) or not np.isfinite(scale):
            raise UserError(f"{cfg.path}: {x.name} attribute scale must be a finite number, got {scale!r}")
        xs *= np.float32(scale)
    if cfg.check_finite and x.dtype.kind == "f":
        bad = ~np.isfinite(xs.reshape(len(xs), -1)).all(axis=1)
        if bad.any():
            raise UserError(f"{cfg.path}: {x.name} row {lo + int(np.argmax(bad))} is not finite (NaN or inf; "
                            f"{int(bad.sum())} such rows here): fix the data, or set data.check_finite = false")
    if y.dtype.kind == "f" and not np.isfinite(ys).all():
        row = lo + int(np.argmax(~np.isfinite(ys.reshape(len(ys), -1)).all(axis=1)))
        raise UserError(f"{cfg.path}: {y.name} row {row} is not finite (NaN or inf targets)")
    return Split(xs, ys, lo, n)
