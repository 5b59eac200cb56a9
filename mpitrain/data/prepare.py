"""`mpitrain data ...`: bundled digits, a synthetic teacher-network set, .npz conversion."""

from __future__ import annotations

import contextlib
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as fmt

from ..errors import UserError
from ..progress import bar
from .write import _attrs, serial_file, write_parallel, write_serial

CHUNK_BYTES = 64 << 20  # bytes of a member read at a time
_UNREADABLE = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def digits(out: str, test_fraction: float = 0.2, seed: int = 0) -> str:
    """scikit-learn's bundled UCI optdigits (1,797 8x8 images, 10 classes) -> HDF5,
    pixel values scaled to [0, 1], a fixed stratified train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("mpitrain data digits needs scikit-learn (pip install 'mpitrain[data]')") from None
    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):  # stratified: the same fraction of every class
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=round(len(idx) * test_fraction), replace=False)] = True
    write_serial(out, {"train": (x[~test], y[~test]), "test": (x[test], y[test])}, 10,
                 source="scikit-learn load_digits (UCI ML hand-written digits, optdigits test set)",
                 description=f"8x8 images scaled to [0,1]; stratified split, test_fraction={test_fraction}, "
                             f"seed={seed}")
    return f"{out}: train {int((~test).sum())}, test {int(test.sum())} samples, shape (8, 8), 10 classes"


def synthetic(world, out: str, samples: int, test_samples: int, features: int, classes: int,
              hidden: int = 64, seed: int = 0) -> str:
    """Collective: a teacher network's labels on Gaussian inputs, written in parallel.

    The teacher (features -> hidden -> classes, tanh) is drawn from `seed`; each rank
    generates its rows from (seed, split, row block) so the file does not depend on the
    number of ranks that wrote it.
    """
    for k, v in {"--samples": samples, "--features": features, "--classes": classes, "--hidden": hidden}.items():
        if v <= 0:
            raise UserError(f"data synthetic: {k} must be > 0, got {v}")
    if classes < 2 or test_samples < 0:
        raise UserError("data synthetic: need --classes >= 2 and --test-samples >= 0")
    rng = np.random.default_rng([seed, 0])
    w1 = rng.standard_normal((features, hidden), dtype=np.float32) / features ** 0.5
    w2 = rng.standard_normal((hidden, classes), dtype=np.float32) / hidden ** 0.5
    block = 4096

    def fill(split, lo, hi):
        sid = 1 if split == "train" else 2
        xs = [np.random.default_rng([seed, sid, b]).standard_normal((block, features), dtype=np.float32)
              [max(lo - b * block, 0):hi - b * block]
              for b in range(lo // block, -(-hi // block))]
        x = np.concatenate(xs) if xs else np.empty((0, features), np.float32)
        return x, (np.tanh(x @ w1) @ w2).argmax(1)

    sizes = {"train": samples} | ({"test": test_samples} if test_samples else {})
    write_parallel(out, world, sizes, (features,), fill, classes,
                   source=f"mpitrain data synthetic (teacher MLP {features}-{hidden}-{classes}, seed {seed})")
    return f"{out}: train {samples}, test {test_samples} samples, {features} features, {classes} classes"


def convert(src: str, out: str, x_key: str = "x", y_key: str = "y", test_fraction: float = 0.0,
            seed: int = 0, test_src: str | None = None, x_test_key: str | None = None,
            y_test_key: str | None = None, scale: float | None = None, chunk_bytes: int = CHUNK_BYTES) -> str:
    """A .npz with an input array and a target array -> the HDF5 layout.

    Targets: integer (N,) labels (classification; num_classes = max + 1) or float (N,) /
    (N, k) regression targets (stored float32, no num_classes). Inputs are stored float32;
    with `scale` integer inputs keep their type and each x gets the attribute `scale`.
    The test split is an official one (`test_src`: the same keys in another .npz, or
    `x_test_key`/`y_test_key` in this one; rows kept in order), a random `test_fraction` of
    the rows (seeded permutation), or none.

    Members are streamed `chunk_bytes` at a time from their .npy headers, not loaded. The
    random split reads rows out of order: a member stored uncompressed (np.savez) is mapped
    from the .npz; a compressed one (np.savez_compressed) or a Fortran-order one is loaded
    whole.
    """
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if (x_test_key is None) != (y_test_key is None):
        raise UserError("--x-test and --y-test go together: name both arrays of the test split")
    if test_src is not None and x_test_key is not None:
        raise UserError("--test and --x-test/--y-test exclude each other (--test reads the other file's --x/--y)")
    if test_fraction > 0 and (test_src is not None or x_test_key is not None):
        raise UserError(f"--test-fraction {test_fraction} and an official test split (--test, or --x-test/--y-test) "
                        "exclude each other")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise UserError(f"--scale must be a finite number > 0, got {scale}")
    for path in (src, test_src):
        if path is not None and Path(out).resolve() == Path(path).resolve():
            raise UserError(f"{out}: is an input file; choose another output")
    with contextlib.ExitStack() as stack:
        npz = _Npz(src, stack)
        x, y = npz.array(x_key, "--x/--y"), npz.array(y_key, "--x/--y")
        _check(x, y)
        test = None
        if test_src is not None:
            other = _Npz(test_src, stack)
            test = other.array(x_key, "--x/--y"), other.array(y_key, "--x/--y")
        elif x_test_key is not None:
            test = npz.array(x_test_key, "--x-test/--y-test"), npz.array(y_test_key, "--x-test/--y-test")
        if test is not None:
            _check(*test)
            _check_like((x, y), test)
        xs = [x] + ([test[0]] if test else [])
        keep = scale is not None and all(a.dtype.kind in "iu" for a in xs)
        x_dtype = np.result_type(*(a.dtype for a in xs)).newbyteorder("=") if keep else np.dtype(np.float32)
        regression = y.dtype.kind == "f"
        y_dtype = np.dtype(np.float32 if regression else np.int64)

        def rows(a: _Member, dtype) -> int:  # rows per block: chunk_bytes as read, or as stored if wider
            return max(1, chunk_bytes // max(1, a.row_bytes, dtype.itemsize * math.prod(a.shape[1:])))

        labels: list[int] = []  # the largest label of each block
        n = x.shape[0]
        with serial_file(out) as f:
            if test_fraction > 0:  # random rows: read out of order
                perm = np.random.default_rng(seed).permutation(n)
                n_test = int(round(n * test_fraction))
                if n_test >= n:
                    raise UserError(f"{src}: {n} rows leave none to train on with --test-fraction {test_fraction}")
                xa, ya = x.load(), y.load()
                parts = {"train": perm[n_test:]} | ({"test": perm[:n_test]} if n_test else {})
                sizes = {k: len(v) for k, v in parts.items()}
                for name, idx in parts.items():
                    _put(f, name, "x", x, x_dtype, len(idx), _gathered(xa, idx, rows(x, x_dtype)), scale)
                    _put(f, name, "y", y, y_dtype, len(idx), _targets(y, _gathered(ya, idx, rows(y, y_dtype)), labels))
            else:  # rows in order: streamed
                pairs = {"train": (x, y)} | ({"test": test} if test else {})
                sizes = {k: v[0].shape[0] for k, v in pairs.items()}
                for name, (xm, ym) in pairs.items():
                    _put(f, name, "x", xm, x_dtype, sizes[name], xm.chunks(rows(xm, x_dtype)), scale)
                    _put(f, name, "y", ym, y_dtype, sizes[name], _targets(ym, ym.chunks(rows(ym, y_dtype)), labels))
            num_classes = None if regression else max(labels) + 1
            split = (f"random test_fraction={test_fraction}, seed={seed}" if test_fraction > 0 else
                     f"official test split from {Path(test_src).name}" if test_src is not None else
                     f"official test split {x_test_key}/{y_test_key}" if x_test_key is not None else "no test split")
            k = math.prod(y.shape[1:])
            targets = f"{k} float target{'s' * (k > 1)} per row" if regression else f"{num_classes} classes"
            inputs = f"x {x_dtype}" + (f" (inputs = x * scale, scale {scale})" if scale is not None else "")
            _attrs(f, num_classes, f"converted from {Path(src).name}", f"{inputs}; {targets}; {split}")
    tail = f", {targets}" + (f", x {x_dtype} scale {scale:g}" if scale is not None else "")
    return (f"{out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f" samples, shape {x.shape[1:]}"
            + tail)


def _unreadable(src, e) -> UserError:
    return UserError(f"{src}: not a readable .npz without pickled objects ({type(e).__name__}: {e})")


class _Npz:
    """A .npz opened for streaming: its members are read from their .npy headers."""

    def __init__(self, src: str, stack: contextlib.ExitStack):
        self.src = src
        try:
            self.zf = stack.enter_context(zipfile.ZipFile(src))
        except FileNotFoundError:
            raise UserError(f"{src}: no such file") from None
        except IsADirectoryError:
            raise UserError(f"{src}: is a directory, not a .npz") from None
        except _UNREADABLE as e:
            raise _unreadable(src, e) from None
        self.names = [n[:-4] for n in self.zf.namelist() if n.endswith(".npy")]

    def array(self, key: str, flags: str) -> "_Member":
        if key not in self.names:
            raise UserError(f"{self.src}: no array {key!r} (found: {', '.join(self.names)}); use {flags}")
        return _Member(self, key)


class _Member:
    """One array of a .npz: shape and dtype from its header; rows in chunks, or the whole."""

    def __init__(self, npz: _Npz, key: str):
        self.npz, self.key, self.info = npz, key, npz.zf.getinfo(key + ".npy")
        try:
            with npz.zf.open(self.info) as f:
                version = fmt.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"{key}: .npy format version {version} is not supported")
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                self.shape, self.fortran, self.dtype = read(f)
                self.header = f.tell()  # bytes before the data
        except _UNREADABLE as e:
            raise _unreadable(npz.src, e) from None
        self.ndim = len(self.shape)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    def chunks(self, rows: int):
        """(first row, block) in order, `rows` rows at a time."""
        n = self.shape[0]
        try:
            with self.npz.zf.open(self.info) as f:
                if self.fortran and self.ndim > 1:  # rows are not contiguous: read it whole
                    whole = fmt.read_array(f, allow_pickle=False)
                    yield from ((lo, whole[lo:lo + rows]) for lo in range(0, n, rows))
                    return
                f.read(self.header)
                for lo in range(0, n, rows):
                    k = min(rows, n - lo)
                    buf = f.read(k * self.row_bytes)
                    if len(buf) != k * self.row_bytes:
                        raise EOFError(f"{self.key} ends after {lo * self.row_bytes + len(buf)} of "
                                       f"{n * self.row_bytes} data bytes")
                    yield lo, np.frombuffer(buf, self.dtype).reshape(k, *self.shape[1:])
                f.read(1)  # to the end: the zip checks the member's CRC
        except _UNREADABLE as e:
            raise _unreadable(self.npz.src, e) from None

    def load(self) -> np.ndarray:
        """The whole array for reads out of order: a read-only map into the .npz when the
        member is stored uncompressed in C order, else read into memory."""
        src, info = self.npz.src, self.info
        try:
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1 and not (
                    self.fortran and self.ndim > 1):
                with open(src, "rb") as fp:
                    fp.seek(info.header_offset)
                    local = fp.read(30)  # the local file header: its name and extra field lengths
                if local[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"{self.key}: bad local file header")
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
                    local[28:30], "little") + self.header
                return np.memmap(src, self.dtype, "r", offset=start, shape=self.shape)
            with self.npz.zf.open(info) as f:
                return fmt.read_array(f, allow_pickle=False)
        except _UNREADABLE as e:
            raise _unreadable(src, e) from None


def _check(x: _Member, y: _Member) -> None:
    """One (inputs, targets) pair: numeric, the same number of rows, targets labels or floats."""
    src = x.npz.src
    if not (y.dtype.kind in "iu" and y.ndim == 1 or y.dtype.kind == "f" and y.ndim in (1, 2)):
        raise UserError(f"{src}: {y.key} must be integer labels (N,) or float targets (N,) or (N, k), "
                        f"got {y.dtype} {y.shape}")
    if x.ndim < 2 or x.dtype.kind not in "fiub":
        raise UserError(f"{src}: {x.key} must be numeric (N, ...) with 2 or more dimensions, got {x.dtype} {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{src}: {x.key} has {x.shape[0]} rows but {y.key} has {y.shape[0]}")
    if x.shape[0] == 0:
        raise UserError(f"{src}: {x.key} has no rows")


def _check_like(train: tuple[_Member, _Member], test: tuple[_Member, _Member]) -> None:
    """The test pair has the train pair's row shapes and kind of targets."""
    (x, y), (xt, yt) = train, test
    if xt.shape[1:] != x.shape[1:]:
        raise UserError(f"{xt.npz.src}: test inputs {xt.key} have rows of shape {xt.shape[1:]}, train {x.key} "
                        f"{x.shape[1:]}")
    if (yt.dtype.kind == "f") != (y.dtype.kind == "f") or yt.shape[1:] != y.shape[1:]:
        raise UserError(f"{yt.npz.src}: test targets {yt.key} ({yt.dtype} {yt.shape}) are not like the train "
                        f"targets {y.key} ({y.dtype} {y.shape})")


def _targets(y: _Member, blocks, labels: list[int]):
    """The blocks, checked: labels >= 0 (their maxima go to `labels`), float targets finite."""
    for lo, b in blocks:
        if y.dtype.kind == "f":
            if not np.isfinite(b).all():
                raise UserError(f"{y.npz.src}: targets must be finite, {y.key} has {b[~np.isfinite(b)][0]}")
        elif len(b):
            if b.min() < 0:
                raise UserError(f"{y.npz.src}: labels must be >= 0, found {b.min()} in {y.key}")
            labels.append(int(b.max()))
        yield lo, b


def _gathered(a: np.ndarray, idx: np.ndarray, rows: int):
    """(first row, a[idx[lo:lo + rows]]) blocks, each read in increasing row order."""
    for lo in range(0, len(idx), rows):
        block = idx[lo:lo + rows]
        order = np.argsort(block)
        out = np.empty((len(block), *a.shape[1:]), a.dtype)
        out[order] = a[block[order]]
        yield lo, out


def _put(f, split: str, name: str, src: _Member, dtype, n: int, blocks, scale=None) -> None:
    """Dataset split/name (n rows of src's row shape), filled from (first row, block) pairs."""
    ds = f.create_dataset(f"{split}/{name}", shape=(n, *src.shape[1:]), dtype=dtype)
    if name == "x" and scale is not None:
        ds.attrs["scale"] = scale
    for lo, b in bar(blocks, desc=f"{split}/{name}", unit="block"):
        ds[lo:lo + len(b)] = b.astype(dtype, copy=False)
