"""HDF5 checkpoints: atomic, checksummed, world-size independent, never pickled.

Layout (`h5ls -r` shows it):
    /                attrs: format, format_version, mpitrain_version, step, epoch,
                     samples_in_epoch, world_size, strategy, model, config (TOML), created
    /model/<name>    parameters and buffers (state_dict names)
    /optimizer/state/<param index>/<key>, attrs param_groups (JSON)
    /strategy/<key>  strategy state (BMUF/EASGD center, parameter-store optimizer state,
                     PowerSGD's Q)
    /rng/torch_cpu   (ranks, n) uint8: every rank's torch CPU generator state
    /rng/torch_cuda  (ranks, m) uint8: every rank's CUDA generator state (GPU jobs only)
    /amp/scale, /amp/growth_tracker  fp16 loss scaling (fp16 jobs only; the same on every rank)
    /ranks/<r>/<key> (strategies whose replicas differ) every rank's own state before the
                     checkpoint consolidated it: param.<name>, optim.<index>.<key>, strategy.<key>;
                     and/or rank.<key>: per-rank strategy state (compression residuals)
Every dataset carries a `crc32` attribute over its bytes, and the file ends with a trailer
`\nmpitrain-sha256 <64 hex>\n` over all the bytes before it (HDF5 ignores bytes past its
end of file), so attributes and metadata are covered too: a file is verified with plain
reads *before* HDF5 parses it (h5py can crash on corrupted metadata), and then parsed from
the verified bytes in memory. A checkpoint is written by rank 0 to `ckpt-<step>.h5.tmp`,
flushed, fsync'ed and renamed to `ckpt-<step>.h5` (atomic on POSIX), then all but the
newest `output.keep` are removed. Loading reads arrays only (numpy, JSON, TOML): nothing
in a checkpoint can execute code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from . import __version__, files
from .comm import heartbeat
from .errors import UserError

FORMAT = "mpitrain-checkpoint"
FORMAT_VERSION = 1
NAME = re.compile(r"^ckpt-(\d{9})\.h5$")


CHUNK = 16 * 2**20  # bytes per write (a watchdog tick each)
TRAILER = b"\nmpitrain-sha256 "
TRAILER_LEN = len(TRAILER) + 64 + 1


def _trailer(image: bytes) -> bytes:
    return TRAILER + hashlib.sha256(image).hexdigest().encode() + b"\n"


def verified_bytes(path: Path) -> bytes:
    """The HDF5 bytes of a checkpoint whose whole-file checksum matches (plain reads only)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    image, trailer = data[:-TRAILER_LEN], data[-TRAILER_LEN:]
    if len(data) < TRAILER_LEN or not trailer.startswith(TRAILER) or not trailer.endswith(b"\n"):
        raise UserError(f"{path}: no whole-file checksum trailer (truncated, or not an mpitrain checkpoint)")
    if trailer != _trailer(image):
        raise UserError(f"{path}: whole-file checksum mismatch (corrupted)")
    return image


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


@dataclass
class Snapshot:
    """What a checkpoint holds, as plain arrays and scalars."""

    step: int
    epoch: int
    samples_in_epoch: int
    world_size: int
    strategy: str
    model_name: str
    config: str
    model: dict[str, np.ndarray]
    optimizer_state: dict[str, dict[str, np.ndarray]]
    param_groups: list[dict]
    strategy_state: dict[str, np.ndarray]
    rng: np.ndarray  # (ranks, n) uint8
    rank_state: list[dict[str, np.ndarray]] = field(default_factory=list)  # every rank's own, or none
    cuda_rng: np.ndarray | None = None  # (ranks, m) uint8, GPU jobs
    amp: dict[str, np.ndarray] = field(default_factory=dict)  # fp16 loss scaling (precision.Precision)
    mpitrain_version: str = __version__


def _put(g: h5py.Group, name: str, a) -> None:
    heartbeat.tick()
    a = np.asarray(a)
    d = g.create_dataset(name, data=a)
    d.attrs["crc32"] = crc(a)


def write(path: Path, snap: Snapshot) -> float:
    """Write snap atomically to path (rank 0 only); returns seconds taken."""
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    # Build the file in memory, then write its bytes with plain POSIX I/O: a full disk is
    # then an ordinary OSError (HDF5 1.10 segfaulted on ENOSPC during close, measured).
    with h5py.File(f"mem-{path.name}", "w", driver="core", backing_store=False) as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, mpitrain_version=snap.mpitrain_version,
                       step=snap.step, epoch=snap.epoch, samples_in_epoch=snap.samples_in_epoch,
                       world_size=snap.world_size, strategy=snap.strategy, model=snap.model_name,
                       config=snap.config, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        m = f.create_group("model")
        for k, v in snap.model.items():
            _put(m, k, v)
        o = f.create_group("optimizer")
        o.attrs["param_groups"] = json.dumps(snap.param_groups)
        st = o.create_group("state")
        for idx, entries in snap.optimizer_state.items():
            g = st.create_group(str(idx))
            for k, v in entries.items():
                _put(g, k, v)
        s = f.create_group("strategy")
        for k, v in snap.strategy_state.items():
            _put(s, k, v)
        g = f.create_group("rng")
        _put(g, "torch_cpu", snap.rng)
        if snap.cuda_rng is not None:
            _put(g, "torch_cuda", snap.cuda_rng)
        if snap.amp:
            g = f.create_group("amp")
            for k, v in snap.amp.items():
                _put(g, k, v)
        for r, arrays in enumerate(snap.rank_state):
            g = f.require_group("ranks").create_group(str(r))
            for k, v in arrays.items():
                _put(g, k, v)
        f.flush()
        image = f.id.get_file_image()
    try:
        tmp.unlink(missing_ok=True)  # never write through a symlink planted as the temporary name
        with os.fdopen(files.open_fd(tmp), "wb") as fh:
            view = memoryview(image)
            for at in range(0, len(view), CHUNK):  # the watchdog sees a long write progress
                fh.write(view[at:at + CHUNK])
                heartbeat.tick()
            fh.write(_trailer(image))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return time.perf_counter() - t0


def read(path: Path) -> Snapshot:
    """Verify the whole file, then load it and verify every array; UserError if anything is
    wrong (never a crash: HDF5 only ever sees bytes whose checksum matched)."""
    image = verified_bytes(path)
    try:
        with h5py.File(io.BytesIO(image), "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise UserError(f"{path}: not an mpitrain checkpoint")
            bad = []

            def arrays(g):
                out = {}
                for k, d in g.items():
                    if not isinstance(d, h5py.Dataset):
                        raise UserError(f"{path}: {d.name} is not an array")
                    a = d[()]
                    if "crc32" not in d.attrs or crc(a) != int(d.attrs["crc32"]):
                        bad.append(d.name)
                    out[k] = a
                return out

            for need in ("model", "optimizer/state", "strategy", "rng/torch_cpu"):
                if need not in f:
                    raise UserError(f"{path}: incomplete checkpoint (no {need})")
            snap = Snapshot(
                step=int(f.attrs["step"]), epoch=int(f.attrs["epoch"]),
                samples_in_epoch=int(f.attrs["samples_in_epoch"]), world_size=int(f.attrs["world_size"]),
                strategy=str(f.attrs["strategy"]), model_name=str(f.attrs["model"]), config=str(f.attrs["config"]),
                model=arrays(f["model"]),
                optimizer_state={k: arrays(g) for k, g in f["optimizer/state"].items()},
                param_groups=json.loads(f["optimizer"].attrs["param_groups"]),
                strategy_state=arrays(f["strategy"]), rng=arrays(f["rng"])["torch_cpu"],
                cuda_rng=arrays(f["rng"]).get("torch_cuda"), amp=arrays(f["amp"]) if "amp" in f else {},
                rank_state=[arrays(f[f"ranks/{r}"]) for r in range(len(f["ranks"]))] if "ranks" in f else [],
                mpitrain_version=str(f.attrs["mpitrain_version"]))
            if bad:
                raise UserError(f"{path}: checksum mismatch in {', '.join(bad[:3])}")
            if not isinstance(snap.param_groups, list) or not all(isinstance(g, dict) for g in snap.param_groups):
                raise UserError(f"{path}: optimizer param_groups is not a list of tables")
            return snap
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in run_dir, newest first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if NAME.match(p.name)), reverse=True)


def prune(run_dir: Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[keep:]:
        p.unlink(missing_ok=True)
    for p in run_dir.glob("ckpt-*.h5.tmp"):
        p.unlink(missing_ok=True)


def newest_valid(run_dir: Path, log=None) -> tuple[Path, Snapshot] | None:
    """The newest checkpoint that reads and verifies; broken ones are reported and skipped."""
    for p in list_checkpoints(run_dir):
        try:
            return p, read(p)
        except UserError as e:
            if log:
                log.warning(f"skipping checkpoint: {e}")
    return None


def path_for(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:09d}.h5"


def describe(path: str) -> str:
    """`mpitrain inspect`: what a checkpoint holds and whether it verifies."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint")
    try:
        snap = read(p)
    except UserError as e:
        raise UserError(f"INVALID: {e}") from None
    lines = [f"{p}: valid (whole-file sha256 and every array's crc32 match)",
             f"  step {snap.step}, epoch {snap.epoch} (+{snap.samples_in_epoch} samples), written at "
             f"{snap.world_size} ranks by mpitrain {snap.mpitrain_version}",
             f"  strategy {snap.strategy}, model {snap.model_name}, "
             f"{sum(a.size for a in snap.model.values()):,} model values"]
    with h5py.File(io.BytesIO(verified_bytes(p)), "r") as f:
        def show(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  /{name:40s} {str(obj.dtype):8s} {str(obj.shape):16s} crc32 "
                             f"{int(obj.attrs['crc32']):08x}")
        f.visititems(show)
    return "\n".join(lines)
