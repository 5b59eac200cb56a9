"""Per-epoch metrics as JSON lines, and optionally TensorBoard event files (rank 0 writes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import files
from .errors import UserError


class MetricsLog:
    """Appends one JSON line per epoch. A failed write (full disk, read-only file) leaves
    no torn line behind and becomes one UserError naming the file."""

    def __init__(self, path: Path | None, board=None):
        self.path = path
        self.rows: list[dict] = []
        self.board = board  # output.tensorboard: the same rows as scalars, by step (open_tensorboard)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.board is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.board.add_scalar(k, v, global_step=row["step"])
            self.board.flush()
        if self.path is None:
            return
        line = memoryview((json.dumps(row) + "\n").encode())
        try:
            fd = files.open_fd(self.path, append=True)
            try:
                size = os.fstat(fd).st_size
                try:
                    while line:  # unbuffered: a short write is seen, not hidden in a buffer
                        line = line[os.write(fd, line):]
                except OSError:
                    os.ftruncate(fd, size)  # no torn line (truncating frees the space it took)
                    raise
            finally:
                os.close(fd)
        except OSError as e:
            raise UserError(f"{self.path}: cannot append the epoch {row.get('epoch')} metrics: "
                            f"{e.strerror or e}") from None


def trim(path: Path, step: int, epochs: int | None = None) -> int:
    """Keep the rows of metrics.jsonl up to `step` and, if given, of the first `epochs`
    epochs (a resumed run writes the later ones again, so none is repeated); lines that are
    not JSON rows (torn by a crash) are dropped. Returns how many lines were dropped so."""
    keep, torn = [], 0
    for ln in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(ln)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("epoch"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            torn += bool(ln.strip())
        elif row["step"] <= step and (epochs is None or row["epoch"] <= epochs):
            keep.append(ln)
    files.replace_text(path, "".join(ln + "\n" for ln in keep))
    return torn


def open_tensorboard(path: Path | None):
    """output.tensorboard: a SummaryWriter writing event files to `path` (rank 0; None
    elsewhere, where only the package is checked). One line if the tensorboard package is
    missing or `path` cannot be made a folder to write in (a file in its place, no
    permission): the job was asked for these files, so it stops at start-up rather than
    train for hours without them."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("output.tensorboard = true needs the tensorboard package "
                        "(pip install 'mpitrain[tensorboard]'; scripts/setup.sh installs it)") from None
    if path is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    try:
        path.mkdir(exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        return SummaryWriter(str(path))
    except OSError as e:
        raise UserError(f"output.tensorboard: cannot write event files to {path}: {e.strerror or e}") from None


def reset(path: Path, pos, train_cfg, log) -> None:
    """Rank 0: metrics.jsonl keeps the rows up to the resumed position `pos` (a
    state.Position; emptied on a fresh start)."""
    try:
        if pos.restored is None:
            files.replace_text(path, "")
            return
        finished = pos.epoch >= train_cfg.epochs or pos.step >= (train_cfg.max_steps or float("inf"))
        # an unfinished epoch is trained (and its row written) again from the position
        torn = trim(path, pos.step, None if finished else pos.epoch)
    except OSError as e:
        raise UserError(f"{path}: cannot rewrite: {e.strerror or e}") from None
    if torn:
        log.warning(f"{path}: dropped {torn} line(s) that were not JSON rows (a torn write)")
    log.info(f"resuming from step {pos.step} (epoch {pos.epoch + 1}, checkpoint written at "
             f"{pos.restored['meta']['world_size']} ranks)")
