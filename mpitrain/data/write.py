"""Writing data sets: the layout every reader expects, and parallel (mpio) writes.

Layout: groups `train` and `test`, each with datasets `x` (N, ...) float32 (or integers
with an attribute `scale` the loader multiplies by) and `y`: (N,) int64 labels, or float32
regression targets (N,) / (N, k); file attributes `num_classes` (labels only), `source` and
`description`. Token streams (text.py) use `train/tokens` and `test/tokens` instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError


@contextmanager
def serial_file(path: str | Path):
    """An h5py file written from one process, atomically: `path`.tmp, renamed to `path` when
    the block ends without an error, removed otherwise. An OSError that leaves the block is
    a UserError "cannot write" (readers turn their own OSErrors into UserErrors first)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(tmp, "w")
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with f:
            yield f
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
        raise


def write_serial(path: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 num_classes: int, source: str, description: str = "", x_dtype=np.float32,
                 x_scale: float | None = None) -> None:
    """Write whole arrays from one process (atomically: temp file, then rename). Inputs are
    stored as `x_dtype`; `x_scale` (an attribute of each x) is what the loader multiplies
    them by."""
    with serial_file(path) as f:
        _attrs(f, num_classes, source, description)
        for name, (x, y) in splits.items():
            g = f.create_group(name)
            dx = g.create_dataset("x", data=np.asarray(x, dtype=x_dtype))
            if x_scale is not None:
                dx.attrs["scale"] = x_scale
            g.create_dataset("y", data=np.asarray(y, dtype=np.int64))


def _attrs(f, num_classes, source, description):
    """File attributes; num_classes None (regression targets, token streams) writes none."""
    if num_classes is not None:
        f.attrs["num_classes"] = int(num_classes)
    f.attrs["source"] = source
    f.attrs["description"] = description


def write_parallel(path: str | Path, world, sizes: dict[str, int], shape: tuple[int, ...], fill,
                   num_classes: int, source: str, description: str = "") -> None:
    """Collective: create the file with mpio and let each rank write its contiguous rows.

    `fill(split, lo, hi)` returns this rank's (x, y) for rows [lo, hi) of `split`. A file
    system error (every rank sees it: the open is collective) is a UserError.
    """
    try:
        _write_parallel(Path(path), world, sizes, shape, fill, num_classes, source, description)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None


def _write_parallel(path: Path, world, sizes, shape, fill, num_classes, source, description) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    world.on_root(_on_root, path.parent.mkdir, parents=True, exist_ok=True)  # its error, on every rank
    with h5py.File(tmp, "w", driver="mpio", comm=world.comm) as f:
        _attrs(f, num_classes, source, description)
        for name, n in sizes.items():
            g = f.create_group(name)
            dx = g.create_dataset("x", shape=(n, *shape), dtype=np.float32)
            dy = g.create_dataset("y", shape=(n,), dtype=np.int64)
            lo, hi = world.shard(n)
            x, y = fill(name, lo, hi)
            with dx.collective:
                dx[lo:hi] = x
            with dy.collective:
                dy[lo:hi] = y
    world.on_root(_on_root, tmp.replace, path)


def _on_root(fn, *args, **kwargs):
    """fn's file-system error as a UserError (World.on_root shares it with every rank)."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise UserError(f"{e.filename or ''}: cannot write: {e.strerror or e}") from None
