"""`mpitrain data ...`: bundled digits, a synthetic teacher-network set, .npz conversion."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .write import write_parallel, write_serial


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
            seed: int = 0) -> str:
    """A .npz with an input array and an integer label array -> the HDF5 layout."""
    try:
        with np.load(src, allow_pickle=False) as z:
            missing = [k for k in (x_key, y_key) if k not in z.files]
            if missing:
                raise UserError(f"{src}: no array {missing[0]!r} (found: {', '.join(z.files)}); use --x/--y")
            x, y = z[x_key], z[y_key]
    except FileNotFoundError:
        raise UserError(f"{src}: no such file") from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{src}: not a readable .npz without pickled objects ({type(e).__name__}: {e})") from None
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"{src}: {y_key} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if x.shape[0] != y.shape[0] or x.ndim < 2 or x.dtype.kind not in "fiub":
        raise UserError(f"{src}: {x_key} must be numeric with {len(y)} rows, got {x.dtype} {x.shape}")
    if y.min() < 0:
        raise UserError(f"{src}: labels must be >= 0, found {y.min()}")
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    splits = {"train": (x[perm[n_test:]], y[perm[n_test:]])}
    if n_test:
        splits["test"] = (x[perm[:n_test]], y[perm[:n_test]])
    write_serial(out, splits, int(y.max()) + 1, source=f"converted from {Path(src).name}")
    return f"{out}: " + ", ".join(f"{k} {len(v[1])}" for k, v in splits.items()) + f" samples, shape {x.shape[1:]}"
