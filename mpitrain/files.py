"""Writing files in a run folder without following symlinks planted there, and reading
a user's file with one-line errors."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextlib.contextmanager
def reading(name, missing: str = "no such file"):
    """Within the block, a missing file is the UserError "NAME: <missing>" and any other
    OSError "NAME: cannot read: <why>"."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{name}: {missing}") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None


def open_fd(path: Path, *, append: bool = False) -> int:
    """An fd for writing `path` (created 0644; truncated unless `append`); a symlink at
    `path` is an OSError (ELOOP), never followed."""
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    return os.open(path, flags, 0o644)


def write_bytes(path: Path, data: bytes) -> None:
    """Write all of `data` to `path` (not through a symlink)."""
    fd = open_fd(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def replace_text(path: Path, text: str) -> None:
    """Write `path` atomically: a fresh temporary file beside it, then a rename (which
    replaces a symlink itself, not its target)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_bytes(tmp, text.encode())
    os.replace(tmp, path)
