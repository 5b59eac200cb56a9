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
newest `output.keep` are removed.

Where the optimizer state is sharded over the ranks (zero), no rank holds all of it: rank 0
writes everything else and allocates each sharded dataset (contiguous, in its global
unpadded layout) without writing it, every rank writes its pieces at their offsets inside
the HDF5 file (`write_pieces`, pwrite), the ranks hash the file in 64 MiB blocks, and rank 0
appends the digest table and a trailer `\nmpitrain-sha256-blocks <block> <count> <sha256 of
the table>\n` (`seal`). Readers verify the blocks (in parallel on resume: `verify`) and read
/optim/state lazily (`Slab`): each rank reads only the slices it owns.

Loading reads arrays, strings and numbers only: nothing
in a checkpoint can execute code. Format version 1 (mpitrain before the tree) still reads:
`read` maps it onto the tree.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
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
BLOCK = 64 * 2**20  # bytes per digest of a block-sealed checkpoint (one rank hashes each)
BLOCKS = b"\nmpitrain-sha256-blocks "
BLOCKS_LEN = len(BLOCKS) + 16 + 1 + 16 + 1 + 64 + 1
LAZY = ("/optim/state/", "/model/")  # datasets a lazy read leaves on disk (Slab): ranks read only theirs


def _trailer(image: bytes) -> bytes:
    return TRAILER + hashlib.sha256(image).hexdigest().encode() + b"\n"


def _layout(path: Path, size: int, read) -> tuple[int, int, bytes | None, bytes]:
    """(length of the HDF5 image, block size, digest table, whole-file digest) from a
    checkpoint's trailer; table None (and the digest) for a whole-file (v2) trailer."""
    tail = read(size - min(size, BLOCKS_LEN), min(size, BLOCKS_LEN))
    if size >= BLOCKS_LEN and tail.startswith(BLOCKS) and tail.endswith(b"\n"):
        try:
            n = len(BLOCKS)
            block, count = int(tail[n:n + 16], 16), int(tail[n + 17:n + 33], 16)
            digest = bytes.fromhex(tail[n + 34:n + 98].decode())
        except ValueError:
            raise UserError(f"{path}: damaged block-checksum trailer") from None
        image = size - BLOCKS_LEN - 32 * count
        if block <= 0 or count != -(-image // block) or image <= 0:
            raise UserError(f"{path}: damaged block-checksum trailer (block {block}, {count} blocks)")
        table = read(image, 32 * count)
        if hashlib.sha256(table).digest() != digest:
            raise UserError(f"{path}: block-checksum table mismatch (corrupted)")
        return image, block, table, b""
    tail = tail[-TRAILER_LEN:]
    if size < TRAILER_LEN or not tail.startswith(TRAILER) or not tail.endswith(b"\n"):
        raise UserError(f"{path}: no whole-file checksum trailer (truncated, or not an mpitrain checkpoint)")
    try:
        return size - TRAILER_LEN, 0, None, bytes.fromhex(tail[len(TRAILER):-1].decode())
    except ValueError:
        raise UserError(f"{path}: damaged whole-file checksum trailer") from None


def verified_bytes(path: Path) -> bytes:
    """The HDF5 bytes of a checkpoint whose checksums match (plain reads only)."""
    with files.reading(path, "no such checkpoint"):
        data = path.read_bytes()
    image, block, table, whole = _layout(path, len(data), lambda at, n: data[at:at + n])
    if table is None:
        if hashlib.sha256(memoryview(data)[:image]).digest() != whole:
            raise UserError(f"{path}: whole-file checksum mismatch (corrupted)")
    else:
        for i in range(len(table) // 32):
            if hashlib.sha256(memoryview(data)[i * block:min(image, (i + 1) * block)]).digest() != table[32 * i:32 * i + 32]:
                raise UserError(f"{path}: checksum mismatch in block {i} (bytes {i * block}..) (corrupted)")
    return data[:image]


def _pread(fd: int, at: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = os.pread(fd, min(CHUNK, n - len(out)), at + len(out))
        if not got:
            break
        out += got
        heartbeat.tick()
    return bytes(out)


def _digest(fd: int, at: int, n: int) -> bytes:
    h = hashlib.sha256()
    for a in range(at, at + n, CHUNK):
        h.update(_pread(fd, a, min(CHUNK, at + n - a)))
    return h.digest()


def verify(path: Path, rank: int = 0, size: int = 1) -> int:
    """Check this rank's share of a checkpoint's checksums, streaming (blocks i with
    i % size == rank; a whole-file trailer: all on rank 0); returns the HDF5 image's length.
    Not collective: agree on it (state.load)."""
    with files.reading(path, "no such checkpoint"):
        fd = os.open(path, os.O_RDONLY)
    try:
        image, block, table, whole = _layout(path, os.fstat(fd).st_size, lambda at, n: _pread(fd, at, n))
        if table is None:
            if rank == 0 and _digest(fd, 0, image) != whole:
                raise UserError(f"{path}: whole-file checksum mismatch (corrupted)")
            return image
        for i in range(rank, len(table) // 32, size):
            if _digest(fd, i * block, min(block, image - i * block)) != table[32 * i:32 * i + 32]:
                raise UserError(f"{path}: checksum mismatch in block {i} (bytes {i * block}..) (corrupted)")
        return image
    finally:
        os.close(fd)


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _gf2(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec, i = vec >> 1, i + 1
    return out


def crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(A + B) from crc32(A), crc32(B) and len(B) (zlib's crc32_combine): the crc32
    of a dataset whose pieces were written by different ranks."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = [_gf2(odd, v) for v in odd]  # two zero bits
    odd = [_gf2(even, v) for v in even]  # four
    while len2:  # apply len2 zero bytes to crc1, squaring the operator per bit of len2
        even = [_gf2(odd, v) for v in odd]
        if len2 & 1:
            crc1 = _gf2(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = [_gf2(even, v) for v in even]
        if len2 & 1:
            crc1 = _gf2(odd, crc1)
        len2 >>= 1
    return crc1 ^ crc2


@dataclass
class Pieces:
    """A dataset every rank writes part of (zero's optimizer state): its global shape and
    dtype, and this rank's pieces as (offset into the flattened array, 1-D values)."""

    shape: tuple
    dtype: np.dtype
    pieces: list


@dataclass
class Slab:
    """An array left in the checkpoint file (a lazy read of /optim/state): `read` gives a
    flat range without reading the rest; np.asarray reads it all and checks its crc32."""

    path: Path
    name: str
    offset: int
    shape: tuple
    dtype: np.dtype
    crc: int | None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Values lo..hi of the flattened array."""
        n = self.dtype.itemsize
        with files.reading(self.path, "no such checkpoint"):
            fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = _pread(fd, self.offset + lo * n, (hi - lo) * n)
        finally:
            os.close(fd)
        if len(raw) != (hi - lo) * n:
            raise UserError(f"{self.path}: {self.name} ends early (truncated)")
        return np.frombuffer(raw, self.dtype).astype(self.dtype.newbyteorder("="))

    def __array__(self, dtype=None, copy=None):
        a = self.read(0, self.size).reshape(self.shape)
        if self.crc is None or crc(a) != self.crc:
            raise UserError(f"{self.path}: checksum mismatch in {self.name}")
        return a if dtype is None else a.astype(dtype)


def _put_tree(g: h5py.Group, tree: dict, crcs: dict | None = None, placed: dict | None = None) -> None:
    """dicts as groups, strings / bools / ints / floats as attributes, the rest as arrays;
    Pieces as datasets allocated in the file but not written (their crc32 from `crcs`,
    their file offsets into `placed`)."""
    for k, v in tree.items():
        k = str(k)
        if isinstance(v, dict):
            _put_tree(g.create_group(k), v, crcs, placed)
        elif isinstance(v, (str, bool, int, float)):
            g.attrs[k] = v
        elif isinstance(v, Pieces):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # its place in the file is fixed now
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # and not written here: the ranks write it
            d = g.create_dataset(k, shape=v.shape, dtype=v.dtype, dcpl=dcpl)
            d.attrs["crc32"] = crcs[d.name]
            placed[d.name] = int(d.id.get_offset())
        else:
            heartbeat.tick()
            a = np.asarray(v)
            d = g.create_dataset(k, data=a)
            d.attrs["crc32"] = crc(a)


def _get_tree(g: h5py.Group, bad: list, limit: int, lazy: Path | None = None) -> dict:
    """The inverse of _put_tree; datasets whose crc32 does not match are named in `bad`;
    a dataset larger than `limit` bytes (the file's size) is not read. `lazy` (the file's
    path): contiguous datasets under LAZY become Slabs."""
    out = {k: _plain(v) for k, v in g.attrs.items()}
    for k, d in g.items():
        if isinstance(d, h5py.Group):
            out[k] = _get_tree(d, bad, limit, lazy)
            continue
        if not isinstance(d, h5py.Dataset):
            raise UserError(f"{d.name} is not an array")
        _check_size(d, limit)
        if lazy is not None and (slab := _slab(lazy, d, limit)) is not None:
            out[k] = slab
            continue
        a = d[()]
        if "crc32" not in d.attrs or crc(np.asarray(a)) != int(d.attrs["crc32"]):
            bad.append(d.name)
        out[k] = np.asarray(a)
    out.pop("crc32", None)
    return out


def _slab(path: Path, d: h5py.Dataset, limit: int) -> Slab | None:
    """A lazy dataset: under LAZY, stored whole and plain inside the image; else None."""
    if not d.name.startswith(LAZY) or d.ndim == 0 or d.chunks is not None or d.compression or d.external:
        return None
    at = d.id.get_offset()
    if at is None or at < 0 or at + d.size * d.dtype.itemsize > limit:
        return None  # (not allocated, or outside the image: an eager read reports it)
    c = d.attrs.get("crc32")
    return Slab(path, d.name, int(at), tuple(d.shape), np.dtype(d.dtype), None if c is None else int(c))


def _check_size(d: h5py.Dataset, limit: int) -> None:
    """Our datasets are plain arrays stored whole in the file: one that claims more bytes
    than the file has is crafted or damaged (reading it could exhaust memory)."""
    if d.dtype.kind not in "biufS" or d.size * d.dtype.itemsize > limit:
        raise UserError(f"{d.name}: {d.shape} {d.dtype} does not fit a {limit}-byte checkpoint")


# What `probe` runs in a child process: parse the verified file and read every attribute
# and array (a slice at a time), so that a crash or a runaway allocation in libhdf5 on a
# crafted file (one whose checksums were recomputed after the damage) ends the child, not
# the job.
_PROBE = r"""
import resource, sys
path, image = sys.argv[1], int(sys.argv[2])
cap = max(4 * 2**30, 16 * min(image, 2**28))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]  # (under a job's own cap, e.g. ulimit -v: that one)
cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
import h5py
try:
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            dict(obj.attrs)
            if isinstance(obj, h5py.Dataset):
                if obj.dtype.kind not in "biufS" or obj.size * obj.dtype.itemsize > image:
                    raise ValueError(f"/{name}: {obj.shape} {obj.dtype} does not fit a {image}-byte checkpoint")
                if obj.ndim == 0:
                    obj[()]
                    return
                rows = max(1, 2**24 // max(1, obj.size // max(1, obj.shape[0]) * obj.dtype.itemsize))
                for i in range(0, obj.shape[0], rows):
                    obj[i:i + rows]
        dict(f.attrs)
        f.visititems(visit)
except BaseException as e:
    print(" ".join(f"{type(e).__name__}: {e}"[:300].split()))
    sys.exit(3)
"""


def probe(path: Path, image: int, timeout: float = 300.0) -> None:
    """Parse the checkpoint at `path` (verified; its HDF5 image is `image` bytes) in a child
    process capped at max(4 GiB, 16 x the image up to 256 MiB) of memory, reading every
    array a slice at a time; UserError, one line, if libhdf5 fails, crashes or runs away
    on it. Not collective (rank 0 probes auto-resume candidates and inspect)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(image)], capture_output=True,
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


def _root(f: h5py.File, tree: dict, meta: dict, crcs=None, placed=None) -> None:
    f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, mpitrain_version=__version__,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _put_tree(f, {"meta": {k: v for k, v in meta.items() if k not in ROOT}} | tree, crcs, placed)


def _temporary(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # never write through a symlink planted as the temporary name
    return tmp


def write(path: Path, tree: dict, meta: dict) -> float:
    """Write the tree (and `meta` as the attributes of /meta) atomically to path (rank 0
    only); returns seconds taken."""
    t0 = time.perf_counter()
    # Build the file in memory, then write its bytes with plain POSIX I/O: a full disk is
    # then an ordinary OSError (HDF5 1.10 segfaulted on ENOSPC during close, measured).
    with h5py.File(f"mem-{path.name}", "w", driver="core", backing_store=False) as f:
        _root(f, tree, meta)
        f.flush()
        image = f.id.get_file_image()
    tmp = _temporary(path)

    def put(fh):
        view = memoryview(image)
        for at in range(0, len(view), CHUNK):  # the watchdog sees a long write progress
            fh.write(view[at:at + CHUNK])
            heartbeat.tick()
        fh.write(_trailer(image))
    _land(tmp, path, lambda: os.fdopen(files.open_fd(tmp), "wb"), put)
    return time.perf_counter() - t0


def _land(tmp: Path, path: Path, opener, put) -> None:
    """put(file) into the temporary file, flush, fsync and rename it to `path` (atomic);
    on an OSError the temporary file is removed and the error raised."""
    try:
        with opener() as fh:
            put(fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# -- a checkpoint written by every rank (zero): shell, pieces, block digests, seal ----------
# (state.save runs the steps in order and agrees on each one's errors)

def piece_crcs(tree: dict) -> list[tuple[str, int, int, int]]:
    """(dataset, offset, crc32, bytes) of each of this rank's pieces in `tree`."""
    return [(name, lo, crc(a), a.nbytes) for name, v in _pieces(tree) for lo, a in v.pieces]


def _pieces(tree: dict, at: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _pieces(v, f"{at}/{k}")
        elif isinstance(v, Pieces):
            yield f"{at}/{k}", v


def whole_crcs(tree: dict, gathered: list) -> dict[str, int]:
    """Each Pieces dataset's crc32 from every rank's piece_crcs; ValueError where the
    pieces do not tile the array exactly."""
    by: dict = {}
    for part in gathered:
        for name, lo, c, n in part:
            by.setdefault(name, []).append((lo, c, n))
    out = {}
    for name, v in _pieces(tree):
        c, at, item = 0, 0, np.dtype(v.dtype).itemsize
        for lo, cp, n in sorted(by.get(name, [])):
            if lo * item != at:
                raise ValueError(f"{name}: pieces do not tile it (a piece at {lo}, expected {at // item})")
            c, at = crc_combine(c, cp, n), at + n
        if at != int(np.prod(v.shape, dtype=np.int64)) * item:
            raise ValueError(f"{name}: pieces cover {at} of {int(np.prod(v.shape, dtype=np.int64)) * item} bytes")
        out[name] = c
    return out


def write_shell(path: Path, tree: dict, meta: dict, crcs: dict) -> dict[str, int]:
    """Rank 0: write `path`'s temporary file with everything but the Pieces' values (their
    space allocated, unwritten); returns their byte offsets in it. OSError (ENOSPC) up front
    where the disk cannot take the whole file."""
    need = _nbytes(tree) * 101 // 100 + 2**16  # (+ the HDF5 metadata)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device (the checkpoint needs {need / 1e6:.1f} MB, "
                                    f"{free / 1e6:.1f} MB free)")
    tmp, placed = _temporary(path), {}
    try:
        with h5py.File(tmp, "w") as f:
            _root(f, tree, meta, crcs, placed)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return placed


def _nbytes(tree: dict) -> int:
    """Bytes of the arrays and Pieces in a tree."""
    total = 0
    for v in tree.values():
        if isinstance(v, dict):
            total += _nbytes(v)
        elif isinstance(v, Pieces):
            total += int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
        elif not isinstance(v, (str, bool, int, float)):
            total += np.asarray(v).nbytes
    return total


def write_pieces(path: Path, tree: dict, placed: dict[str, int]) -> None:
    """Every rank: write its pieces of `tree`'s Pieces into `path`'s temporary file at the
    offsets write_shell gave, then fsync."""
    fd = os.open(path.with_name(path.name + ".tmp"), os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        for name, v in _pieces(tree):
            item = np.dtype(v.dtype).itemsize
            for lo, a in v.pieces:
                view, at = memoryview(np.ascontiguousarray(a, v.dtype)).cast("B"), placed[name] + lo * item
                while view:
                    n = os.pwrite(fd, view[:CHUNK], at)
                    view, at = view[n:], at + n
                    heartbeat.tick()
        os.fsync(fd)
    finally:
        os.close(fd)


def block_digests(path: Path, rank: int, size: int) -> dict[int, bytes]:
    """Every rank: sha256 of blocks rank, rank + size, ... of `path`'s temporary file."""
    fd = os.open(path.with_name(path.name + ".tmp"), os.O_RDONLY)
    try:
        n = os.fstat(fd).st_size
        return {i: _digest(fd, i * BLOCK, min(BLOCK, n - i * BLOCK)) for i in range(rank, -(-n // BLOCK), size)}
    finally:
        os.close(fd)


def seal(path: Path, digests: dict[int, bytes]) -> None:
    """Rank 0: append the digest table and its trailer to the temporary file, fsync, and
    rename it to `path`."""
    tmp = path.with_name(path.name + ".tmp")
    table = b"".join(digests[i] for i in range(len(digests)))
    _land(tmp, path, lambda: open(tmp, "ab"), lambda fh: fh.write(
        table + BLOCKS + b"%016x %016x " % (BLOCK, len(digests)) + hashlib.sha256(table).hexdigest().encode() + b"\n"))


def read(path: Path, isolated: bool = False, lazy: bool = False, verified: int | None = None) -> dict:
    """Verify the whole file, then load its tree and verify every array: a dict with
    "meta" (the root attributes) and the components. UserError, one line, if anything is
    wrong. HDF5 only ever sees bytes whose checksum matched; `isolated` parses them in a
    child process first (`probe`), for files that may have been crafted and re-sealed.
    `lazy`: the file is verified streaming (or was, by the ranks together: `verified` is
    its image length) and parsed from disk, and /optim/state's arrays stay there (Slab)."""
    if lazy:
        image, limit = None, verify(path) if verified is None else verified
    else:
        image = verified_bytes(path)
        limit = len(image)
    if isolated:
        probe(path, limit)
    try:
        with h5py.File(io.BytesIO(image) if image is not None else path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise UserError(f"{path}: not an mpitrain checkpoint")
            version = int(f.attrs.get("format_version", 0))
            if version not in READS:
                raise UserError(f"{path}: checkpoint format version {version}; this mpitrain {__version__} reads "
                                f"versions {', '.join(map(str, READS))} (written by a newer mpitrain? "
                                f"it says {_plain(f.attrs.get('mpitrain_version', '?'))})")
            bad: list[str] = []
            tree = _get_tree(f, bad, limit, Path(path) if lazy else None) if version == 2 else _from_v1(f, bad, limit)
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
            return p, read(p, isolated=True, lazy=True)
        except UserError as e:
            if log:
                log.warning(f"skipping checkpoint: {e}")
    return None


def _slabs(tree: dict):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _slabs(v)
        elif isinstance(v, Slab):
            yield v


def path_for(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:09d}.h5"


def describe(path: str) -> str:
    """`mpitrain inspect`: what a checkpoint holds and whether it verifies."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint")
    try:
        tree = read(p, isolated=True, lazy=True)
        for slab in _slabs(tree):  # their crc32, one array at a time
            np.asarray(slab)
    except UserError as e:
        raise UserError(f"INVALID: {e}") from None
    meta, pos = tree["meta"], tree["position"]
    lines = [f"{p}: valid (the file's sha256 and every array's crc32 match)",
             f"  format {meta.get('format_version')}: step {pos['step']}, epoch {pos['epoch']} "
             f"(+{pos['samples_in_epoch']} samples), written at {meta.get('world_size')} ranks by mpitrain "
             f"{meta.get('mpitrain_version')}",
             f"  strategy {meta.get('strategy')}, model {meta.get('model') or '(Python API)'}, "
             f"{sum(np.size(a) for a in tree['model'].values()):,} model values; components: "
             + ", ".join(k for k in tree if k != "meta")]
    with h5py.File(p, "r") as f:
        def show(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  /{name:40s} {str(obj.dtype):8s} {str(obj.shape):16s} crc32 "
                             f"{int(obj.attrs['crc32']):08x}")
        f.visititems(show)
    return "\n".join(lines)
