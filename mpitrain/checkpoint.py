"""HDF5 checkpoint files: a tree of component state_dicts, atomic, checksummed, world-size
independent, never pickled. No MPI here (state.py is the collective part).

A checkpoint is a tree: groups are components, arrays are datasets, strings and plain
numbers are attributes. Format version 2 (`h5ls -r` shows it):

    /                 attrs: format, format_version, mpitrain_version, created
    /meta             attrs: world_size, strategy, model, config (TOML), replicas_differ
    /position         attrs: step, epoch, samples_in_epoch
    /model/<name>     parameters and buffers (state_dict names)
    /optim/state/<param index>/<key>, attrs: param_groups (JSON)
    /strategy/...     the strategy's state_dict (e.g. BMUF/EASGD center, PowerSGD's Q)
    /precision/...    fp16 loss scaling (scale, growth_tracker), fp16 jobs only
    /ranks/<r>/rng/torch_cpu, torch_cuda   every rank's random generators
    /ranks/<r>/replica/{model,optim,strategy}  where replicas differ (local steps): every
                      rank's own state as it was before the checkpoint consolidated it
    /ranks/<r>/strategy/...  per-rank strategy state (compression's error feedback): fits
                      only the world size it was written at

Every dataset carries a `crc32` attribute over its bytes, and the file ends with a trailer
`\\nmpitrain-sha256 <64 hex>\\n` over all the bytes before it (HDF5 ignores bytes past its
end of file), so attributes and metadata are covered too: a file is verified with plain
reads *before* HDF5 parses it (h5py can crash on corrupted metadata), and then parsed from
the verified bytes in memory. A checkpoint is written by rank 0 to `ckpt-<step>.h5.tmp`,
flushed, fsync'ed and renamed to `ckpt-<step>.h5` (atomic on POSIX), then all but the
newest `output.keep` are removed. Loading reads arrays, strings and numbers only: nothing
in a checkpoint can execute code. Format version 1 (mpitrain before the tree) still reads:
`read` maps it onto the tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

from . import files
from ._version import __version__
from .comm import heartbeat
from .errors import UserError

FORMAT = "mpitrain-checkpoint"
FORMAT_VERSION = 2
READS = (1, 2)
ROOT = ("format", "format_version", "mpitrain_version", "created")  # the file's own attributes, not /meta
NAME = re.compile(r"^ckpt-(\d{9,})\.h5$")
REQUIRED = ("meta", "position", "model", "optim", "ranks/0/rng")  # what every resume needs

CHUNK = 16 * 2**20  # bytes per write (a watchdog tick each)
TRAILER = b"\nmpitrain-sha256 "
TRAILER_LEN = len(TRAILER) + 64 + 1


def _trailer(image: bytes) -> bytes:
    return TRAILER + hashlib.sha256(image).hexdigest().encode() + b"\n"


def verified_bytes(path: Path) -> bytes:
    """The HDF5 bytes of a checkpoint whose whole-file checksum matches (plain reads only)."""
    with files.reading(path, "no such checkpoint"):
        data = path.read_bytes()
    image, trailer = data[:-TRAILER_LEN], data[-TRAILER_LEN:]
    if len(data) < TRAILER_LEN or not trailer.startswith(TRAILER) or not trailer.endswith(b"\n"):
        raise UserError(f"{path}: no whole-file checksum trailer (truncated, or not an mpitrain checkpoint)")
    if trailer != _trailer(image):
        raise UserError(f"{path}: whole-file checksum mismatch (corrupted)")
    return image


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _put_tree(g: h5py.Group, tree: dict) -> None:
    """dicts as groups, strings / bools / ints / floats as attributes, the rest as arrays."""
    for k, v in tree.items():
        k = str(k)
        if isinstance(v, dict):
            _put_tree(g.create_group(k), v)
        elif isinstance(v, (str, bool, int, float)):
            g.attrs[k] = v
        else:
            heartbeat.tick()
            a = np.asarray(v)
            d = g.create_dataset(k, data=a)
            d.attrs["crc32"] = crc(a)


def _get_tree(g: h5py.Group, bad: list, limit: int) -> dict:
    """The inverse of _put_tree; datasets whose crc32 does not match are named in `bad`;
    a dataset larger than `limit` bytes (the file's size) is not read."""
    out = {k: _plain(v) for k, v in g.attrs.items()}
    for k, d in g.items():
        if isinstance(d, h5py.Group):
            out[k] = _get_tree(d, bad, limit)
            continue
        if not isinstance(d, h5py.Dataset):
            raise UserError(f"{d.name} is not an array")
        _check_size(d, limit)
        a = d[()]
        if "crc32" not in d.attrs or crc(np.asarray(a)) != int(d.attrs["crc32"]):
            bad.append(d.name)
        out[k] = np.asarray(a)
    out.pop("crc32", None)
    return out


def _check_size(d: h5py.Dataset, limit: int) -> None:
    """Our datasets are plain arrays stored whole in the file: one that claims more bytes
    than the file has is crafted or damaged (reading it could exhaust memory)."""
    if d.dtype.kind not in "biufS" or d.size * d.dtype.itemsize > limit:
        raise UserError(f"{d.name}: {d.shape} {d.dtype} does not fit a {limit}-byte checkpoint")


# What `probe` runs in a child process: parse the verified bytes and read every array and
# attribute, so that a crash or a runaway allocation in libhdf5 on a crafted file (one whose
# checksum was recomputed after the damage) ends the child, not the job.
_PROBE = r"""
import io, resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import h5py
data = sys.stdin.buffer.read()
try:
    with h5py.File(io.BytesIO(data), "r") as f:
        def visit(name, obj):
            dict(obj.attrs)
            if isinstance(obj, h5py.Dataset):
                if obj.dtype.kind not in "biufS" or obj.size * obj.dtype.itemsize > len(data):
                    raise ValueError(f"/{name}: {obj.shape} {obj.dtype} does not fit a {len(data)}-byte checkpoint")
                obj[()]
        dict(f.attrs)
        f.visititems(visit)
except BaseException as e:
    print(" ".join(f"{type(e).__name__}: {e}"[:300].split()))
    sys.exit(3)
"""


def probe(path: Path, image: bytes, timeout: float = 300.0) -> None:
    """Parse `image` (a checkpoint's verified bytes) in a child process capped at
    max(4 GiB, 16 x the file) of memory; UserError, one line, if libhdf5 fails, crashes or
    runs away on it. Not collective (rank 0 probes auto-resume candidates and inspect)."""
    cap = max(4 * 2**30, 16 * len(image))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(cap)], input=image, capture_output=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise UserError(f"{path}: unreadable checkpoint (parsing it took over {timeout:.0f} s)") from None
    if r.returncode < 0:
        raise UserError(f"{path}: unreadable checkpoint (the HDF5 library crashed on it: signal {-r.returncode})")
    if r.returncode:
        why = r.stdout.decode(errors="replace").strip() or f"exit {r.returncode}"
        raise UserError(f"{path}: unreadable checkpoint ({why})")


def _plain(v):
    """An HDF5 attribute as a Python str / bool / int / float."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    return v


def write(path: Path, tree: dict, meta: dict) -> float:
    """Write the tree (and `meta` as the attributes of /meta) atomically to path (rank 0
    only); returns seconds taken."""
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    # Build the file in memory, then write its bytes with plain POSIX I/O: a full disk is
    # then an ordinary OSError (HDF5 1.10 segfaulted on ENOSPC during close, measured).
    with h5py.File(f"mem-{path.name}", "w", driver="core", backing_store=False) as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, mpitrain_version=__version__,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _put_tree(f, {"meta": {k: v for k, v in meta.items() if k not in ROOT}} | tree)
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


def read(path: Path, isolated: bool = False) -> dict:
    """Verify the whole file, then load its tree and verify every array: a dict with
    "meta" (the root attributes) and the components. UserError, one line, if anything is
    wrong. HDF5 only ever sees bytes whose checksum matched; `isolated` parses them in a
    child process first (`probe`), for files that may have been crafted and re-sealed."""
    image = verified_bytes(path)
    if isolated:
        probe(path, image)
    try:
        with h5py.File(io.BytesIO(image), "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise UserError(f"{path}: not an mpitrain checkpoint")
            version = int(f.attrs.get("format_version", 0))
            if version not in READS:
                raise UserError(f"{path}: checkpoint format version {version}; this mpitrain {__version__} reads "
                                f"versions {', '.join(map(str, READS))} (written by a newer mpitrain? "
                                f"it says {_plain(f.attrs.get('mpitrain_version', '?'))})")
            bad: list[str] = []
            tree = _get_tree(f, bad, len(image)) if version == 2 else _from_v1(f, bad, len(image))
            if bad:
                raise UserError(f"{path}: checksum mismatch in {', '.join(bad[:3])}")
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever h5py raises on a crafted file is one line
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    root = {k: tree.pop(k) for k in list(tree) if not isinstance(tree[k], dict)}
    tree["meta"] = root | tree.get("meta", {})
    for need in REQUIRED:
        if lookup(tree, need) is None:
            raise UserError(f"{path}: incomplete checkpoint: no {need}")
    _check_shapes(path, tree)
    return tree


def lookup(tree: dict, where: str):
    """tree["a"]["b"] for "a/b", None where a part is missing."""
    for part in where.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _check_shapes(path, tree: dict) -> None:
    """The parts the readers index into must have the types they expect."""
    pos = tree["position"]
    for k in ("step", "epoch", "samples_in_epoch"):
        if not isinstance(pos.get(k), int) or isinstance(pos.get(k), bool):
            raise UserError(f"{path}: position/{k} is not an integer")
    groups = tree["optim"].get("param_groups", "[]")
    try:
        groups = json.loads(groups) if isinstance(groups, str) else None
    except ValueError:
        groups = None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise UserError(f"{path}: optim param_groups is not a JSON list of tables")
    tree["optim"]["param_groups"] = groups
    ranks = tree["ranks"]
    if sorted(ranks) != [str(r) for r in range(len(ranks))]:
        raise UserError(f"{path}: ranks/ holds {sorted(ranks)[:4]}, expected 0..{len(ranks) - 1}")
    if not isinstance(tree["meta"].get("world_size"), int):
        raise UserError(f"{path}: meta/world_size is not an integer")


def _from_v1(f: h5py.File, bad: list, limit: int) -> dict:
    """Format 1 (one flat layout, mpitrain before the tree) as a format-2 tree."""
    flat = _get_tree(f, bad, limit)  # its root attribute `model` (the model's id) is shadowed by /model
    rng = flat.get("rng", {})
    cpu, cuda = rng.get("torch_cpu"), rng.get("torch_cuda")
    if cpu is None or np.ndim(cpu) != 2:
        raise UserError("format 1: no rng/torch_cpu (ranks, n)")
    optim = flat.get("optimizer", {})
    groups = optim.get("param_groups", "[]")
    ranks = {}
    for r in range(len(cpu)):
        own = {"rng": {"torch_cpu": cpu[r]} | ({"torch_cuda": cuda[r]} if cuda is not None and r < len(cuda) else {})}
        replica = {"model": {}, "optim": {"state": {}, "param_groups": groups}, "strategy": {}}
        for k, v in flat.get("ranks", {}).get(str(r), {}).items():
            kind, _, name = k.partition(".")
            if kind == "param":
                replica["model"][name] = v
            elif kind == "optim":
                i, _, key = name.partition(".")
                replica["optim"]["state"].setdefault(i, {})[key] = v
            elif kind == "strategy":
                replica["strategy"][name] = v
            # kind "rank" (format 1's per-rank compression state) is not mapped: it starts afresh
        if replica["model"]:
            own["replica"] = replica
        ranks[str(r)] = own
    a = {k: _plain(v) for k, v in f.attrs.items()}  # /model and /strategy shadow two of them in `flat`
    return {"format_version": 1, "mpitrain_version": a.get("mpitrain_version", ""),
            "meta": {"world_size": a.get("world_size"), "strategy": a.get("strategy", ""),
                     "model": a.get("model", ""), "config": a.get("config", ""),
                     "replicas_differ": any("replica" in r for r in ranks.values())},
            "position": {k: flat.get(k) for k in ("step", "epoch", "samples_in_epoch")},
            "model": flat.get("model", {}), "optim": {"state": optim.get("state", {}), "param_groups": groups},
            "strategy": {k: v for k, v in flat.get("strategy", {}).items() if not isinstance(v, dict)},
            "precision": flat.get("amp", {}), "ranks": ranks}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in run_dir, newest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]  # by step: ckpt-1000000000 after ckpt-999999999


def step_of(path: Path) -> int:
    """The step in a checkpoint's name (ckpt-<step>.h5)."""
    return int(NAME.match(path.name).group(1))


def prune(run_dir: Path, keep: int, protect=()) -> None:
    """Remove all but the newest `keep` checkpoints and those in `protect`, and leftover
    temporaries."""
    for p in list_checkpoints(run_dir)[keep:]:
        if p not in protect:
            p.unlink(missing_ok=True)
    for p in run_dir.glob("ckpt-*.h5.tmp"):
        p.unlink(missing_ok=True)


def newest_valid(run_dir: Path, log=None) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads and verifies; broken ones are reported and skipped."""
    for p in list_checkpoints(run_dir):
        try:
            return p, read(p, isolated=True)
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
        tree = read(p, isolated=True)
    except UserError as e:
        raise UserError(f"INVALID: {e}") from None
    meta, pos = tree["meta"], tree["position"]
    lines = [f"{p}: valid (whole-file sha256 and every array's crc32 match)",
             f"  format {meta.get('format_version')}: step {pos['step']}, epoch {pos['epoch']} "
             f"(+{pos['samples_in_epoch']} samples), written at {meta.get('world_size')} ranks by mpitrain "
             f"{meta.get('mpitrain_version')}",
             f"  strategy {meta.get('strategy')}, model {meta.get('model') or '(Python API)'}, "
             f"{sum(np.size(a) for a in tree['model'].values()):,} model values; components: "
             + ", ".join(k for k in tree if k != "meta")]
    with h5py.File(io.BytesIO(verified_bytes(p)), "r") as f:
        def show(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  /{name:40s} {str(obj.dtype):8s} {str(obj.shape):16s} crc32 "
                             f"{int(obj.attrs['crc32']):08x}")
        f.visititems(show)
    return "\n".join(lines)
