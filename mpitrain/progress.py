"""Progress bars for the long commands (tqdm): on a terminal only, on rank 0 only, never in
logs or pipes (tqdm's disable=None turns a bar off where stderr is not a TTY)."""

from __future__ import annotations

from tqdm import tqdm


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", show: bool = True, scale: bool = False):
    """`iterable` with a bar on stderr where `show` (e.g. world.is_root) and stderr is a
    terminal; `scale`: units in k / M (bytes, tokens)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                unit_scale=scale, disable=None if show else True)
