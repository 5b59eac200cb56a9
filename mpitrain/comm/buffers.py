"""torch tensor <-> MPI buffer: dtype allow-list, CUDA-aware detection, pinned-host staging.

Open MPI has no MPI datatype for float16 (MPI_ERR_TYPE) and reduces bfloat16 bytes as
another type (wrong sums, silently), so half-precision tensors are reduced in float32 and
cast back. A CUDA tensor is handed to MPI only when the library is CUDA-aware; otherwise
it is staged through a pinned host buffer (a non-CUDA-aware Open MPI segfaults on a device
pointer); the job agrees on one path for every transfer (World.select_device).

MPI counts are C ints: every call here moves at most counts.MAX_COUNT elements, larger
tensors go in pieces. Broadcasts, allgathers and all-to-alls move any dtype bit for bit as
integer words of its element size (not bytes), so a piece holds up to 2^31 - 1 elements.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import re
import threading

import numpy as np
import torch
from mpi4py import MPI

from . import counts


class Traffic:
    """Bytes this process handed to MPI as payload, counted where the call is made: a
    collective counts its buffer once per call (an allreduce of B bytes counts B, whatever
    algorithm MPI runs inside; a broadcast counts B on the root only), a one-sided
    Put/Get/Accumulate counts the bytes it moves. Control values (flags, counters,
    clocks, metrics) are not counted."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sent = 0

    def add(self, nbytes: int) -> None:
        with self._lock:  # the comm thread counts too
            self.sent += int(nbytes)


TRAFFIC = Traffic()

# dtypes MPI reduces natively (tensor dtype -> MPI datatype)
NATIVE = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
    torch.uint8: MPI.UINT8_T,
}
# dtypes reduced through a float32 copy (exact for values representable in the dtype)
VIA_FLOAT32 = (torch.float16, torch.bfloat16)


def mpi_dtype(t: torch.Tensor):
    """The MPI datatype for a natively reducible tensor, or TypeError."""
    try:
        return NATIVE[t.dtype]
    except KeyError:
        raise TypeError(f"dtype {t.dtype} cannot go to MPI directly (allowed: "
                        f"{', '.join(map(str, NATIVE))}; {VIA_FLOAT32} are reduced in float32)") from None


def host_buffer(t: torch.Tensor):
    """[buffer, datatype] of a contiguous CPU tensor, with no copy."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("host_buffer needs a contiguous CPU tensor")
    return [t.numpy(), mpi_dtype(t)]


def device_buffer(t: torch.Tensor):
    """[buffer, datatype] of a contiguous CUDA tensor for a CUDA-aware MPI (no copy)."""
    # mpi4py accepts objects exposing __cuda_array_interface__ (torch tensors do)
    return [t, mpi_dtype(t)]


@functools.cache
def cuda_aware() -> bool:
    """Whether this process's MPI library accepts CUDA device pointers (this rank's view;
    World.select_device agrees on it over the job before any transfer).

    MPITRAIN_CUDA_AWARE=0/1 decides. Otherwise only the libmpi that mpi4py loaded is asked:
    Open MPI >= 5 by MPIX_Query_cuda_support() (a run-time answer since 5.0), MPICH by
    MPIX_GPU_query_support(CUDA). Open MPI 4.x answers how it was *built*, not whether CUDA
    works now (open-mpi/ompi#7963), so there mpitrain stages through host memory unless
    MPITRAIN_CUDA_AWARE=1: a device pointer handed to a library that cannot take it
    segfaults.
    """
    env = os.environ.get("MPITRAIN_CUDA_AWARE")
    if env in ("0", "1"):
        return env == "1"
    version = MPI.Get_library_version()
    lib = _libmpi()
    if lib is None:
        return False
    if version.startswith("Open MPI"):
        m = re.search(r"v(\d+)\.", version)
        if not m or int(m.group(1)) < 5 or not hasattr(lib, "MPIX_Query_cuda_support"):
            return False
        lib.MPIX_Query_cuda_support.restype = ctypes.c_int
        return bool(lib.MPIX_Query_cuda_support())
    if hasattr(lib, "MPIX_GPU_query_support"):
        ok = ctypes.c_int(0)
        return lib.MPIX_GPU_query_support(ctypes.c_int(0), ctypes.byref(ok)) == 0 and bool(ok.value)  # 0 = CUDA
    return False


def _libmpi():
    """The libmpi that mpi4py loaded (mapped into this process), or None: never another
    one found on a search path."""
    try:
        with open("/proc/self/maps") as f:
            mapped = sorted({line.split()[-1] for line in f if "libmpi.so" in line or "libmpich.so" in line})
    except OSError:
        return None
    for c in mapped:
        try:
            return ctypes.CDLL(c, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:
            continue
    return None


class Stager:
    """Pinned host mirror of one device tensor for MPI on a non-CUDA-aware library (plain
    host memory for a CPU tensor, e.g. the float32 mirror of a float16 one), with copies
    on a side stream ordered against the tensor's producers and consumers: the calling
    thread's current stream, or the event passed in, never the default stream implicitly."""

    def __init__(self, like: torch.Tensor):
        dtype = torch.float32 if like.dtype in VIA_FLOAT32 else like.dtype
        self.host = torch.empty(like.numel(), dtype=dtype, pin_memory=like.is_cuda)
        self.nbytes = self.host.numel() * self.host.element_size()
        self.stream = torch.cuda.Stream(like.device) if like.is_cuda else None
        self._copied: "torch.cuda.Event | None" = None  # after the last copy out of the host buffer

    def to_host(self, t: torch.Tensor, ready: "torch.cuda.Event | None" = None) -> torch.Tensor:
        """The host copy of t, complete on return. The copy starts after `ready` (an event
        recorded where t was produced) or after everything queued so far on this thread's
        current stream."""
        if self.stream is None:
            self.host.copy_(t.reshape(-1))
            return self.host
        if ready is not None:
            self.stream.wait_event(ready)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            self.host.copy_(t.reshape(-1), non_blocking=True)
        self.stream.synchronize()  # MPI reads the host buffer next (waits for this stream only)
        return self.host

    def writable(self) -> torch.Tensor:
        """The host buffer, once no queued copy reads it any more (for MPI to receive into)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self.host

    def to_device(self, t: torch.Tensor) -> None:
        """t := the host copy, queued (not waited for) after the kernels queued so far on
        this thread's current stream (no write under a pending read); that stream's later
        kernels see the new values. The host buffer is busy until the copy has run:
        to_host queues behind it, `writable` waits for it."""
        if self.stream is None:
            t.reshape(-1).copy_(self.host)
            return
        current = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            t.reshape(-1).copy_(self.host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self.stream)
        current.wait_stream(self.stream)


# Host bytes the cached stagers hold together at most (least recently used dropped first):
# a job reuses a few shapes every step, while a broadcast of every parameter must not pin
# the model's size in host memory for good.
STAGER_CACHE_BYTES = 256 << 20
_STAGERS: "collections.OrderedDict" = collections.OrderedDict()
_STAGERS_BYTES = 0
_STAGERS_LOCK = threading.Lock()


def stager_for(t: torch.Tensor, slot: int = 0) -> Stager:
    """A Stager for tensors like t (device, dtype, size), cached per thread and `slot` (two
    buffers of one call need two slots): pinned memory is costly to allocate, and a job
    moves the same shapes every step. The cache keeps at most STAGER_CACHE_BYTES; a larger
    stager is made for the call and dropped after it."""
    global _STAGERS_BYTES
    key = (threading.get_ident(), slot, t.device, t.dtype, t.numel())
    with _STAGERS_LOCK:
        st = _STAGERS.pop(key, None)
        if st is None:
            st = Stager(t)
            if st.nbytes > STAGER_CACHE_BYTES:
                return st
            _STAGERS_BYTES += st.nbytes
        _STAGERS[key] = st  # the most recently used last
        while _STAGERS_BYTES > STAGER_CACHE_BYTES:
            _STAGERS_BYTES -= _STAGERS.popitem(last=False)[1].nbytes
        return st


# an unsigned/signed integer word for each element size: any dtype moves bit for bit,
# counted in elements instead of bytes (complex128 as two int64)
_WORDS = {1: (torch.uint8, MPI.UINT8_T), 2: (torch.int16, MPI.INT16_T), 4: (torch.int32, MPI.INT32_T),
          8: (torch.int64, MPI.INT64_T)}


def _words(t: torch.Tensor):
    """(flat view of contiguous t as integer words, their MPI datatype)."""
    dtype, datatype = _WORDS[min(8, t.element_size())]
    return t.reshape(-1).view(dtype), datatype


def iallreduce_(comm: MPI.Intracomm, t: torch.Tensor) -> list:
    """Collective: nonblocking in-place SUM of a contiguous CPU tensor of a native dtype;
    the requests to wait for (one per MAX_COUNT elements)."""
    flat, datatype = t.reshape(-1).numpy(), mpi_dtype(t)
    return [comm.Iallreduce(MPI.IN_PLACE, [flat[lo:hi], datatype], op=MPI.SUM) for lo, hi in counts.chunks(len(flat))]


def allreduce_(comm: MPI.Intracomm, t: torch.Tensor, *, direct: bool = False, stager: Stager | None = None,
               ready: "torch.cuda.Event | None" = None, count: bool = True, via=None) -> torch.Tensor:
    """Collective: in-place SUM allreduce of a contiguous tensor of any allowed dtype/device.

    float16/bfloat16 go through float32. A CUDA tensor goes to MPI as a device buffer only
    with `direct` (the job's agreed path, World.direct_cuda), else through a pinned host
    buffer (`stager`, default a cached one). `ready`: an event after which t is complete
    (default: everything queued on this thread's current stream). `via`: an object whose
    `allreduce_(buf)` does the sum instead of comm.Allreduce (e.g. a NodeHierarchy); it
    gets pieces of at most counts.MAX_COUNT elements, like MPI.
    """
    if not t.is_contiguous():
        raise ValueError("allreduce_ needs a contiguous tensor")
    if count:
        TRAFFIC.add(t.numel() * (4 if t.dtype in VIA_FLOAT32 else t.element_size()))
    if t.is_cuda and direct and t.dtype not in VIA_FLOAT32:
        if ready is not None:
            ready.synchronize()
        else:
            torch.cuda.current_stream(t.device).synchronize()
        counts.allreduce_chunks(comm, t.reshape(-1), mpi_dtype(t), MPI.SUM, via)
        return t
    if t.is_cuda or t.dtype in VIA_FLOAT32:  # through a host (float32) mirror
        st = stager or stager_for(t)
        host = st.to_host(t, ready)
        counts.allreduce_chunks(comm, host.numpy(), mpi_dtype(host), MPI.SUM, via)
        st.to_device(t)
        return t
    counts.allreduce_chunks(comm, t.reshape(-1).numpy(), mpi_dtype(t), MPI.SUM, via)
    return t


def _exchange(comm: MPI.Intracomm, collective, t: torch.Tensor, row: int, direct: bool) -> torch.Tensor:
    """collective (Allgather or Alltoall) of contiguous t, `row` elements of it per rank,
    into a new flat tensor of ranks * row elements on t's device: device buffers where
    `direct`, pinned host buffers for other CUDA tensors."""
    send, datatype = _words(t)
    row *= t.element_size() // send.element_size()  # in words
    TRAFFIC.add(t.numel() * t.element_size())
    recv = torch.empty(comm.Get_size() * row, dtype=send.dtype, device=t.device)
    if t.is_cuda and direct:
        torch.cuda.current_stream(t.device).synchronize()
        counts.by_rows(collective, send, recv, datatype, row)
    elif t.is_cuda:
        out = stager_for(recv, slot=1)
        counts.by_rows(collective, stager_for(send).to_host(send).numpy(), out.writable().numpy(), datatype, row)
        out.to_device(recv)
    else:
        counts.by_rows(collective, send.numpy(), recv.numpy(), datatype, row)
    return recv.view(t.dtype)


def allgather(comm: MPI.Intracomm, t: torch.Tensor, *, direct: bool = False) -> torch.Tensor:
    """Collective: every rank's t (same shape and dtype everywhere, any dtype: moved bit
    for bit), stacked to (ranks, *t.shape) on t's device. CUDA tensors as allreduce_
    (device buffers only on the agreed `direct` path, else pinned host buffers)."""
    t = t.detach().contiguous()
    return _exchange(comm, comm.Allgather, t, t.numel(), direct).reshape(comm.Get_size(), *t.shape)


def alltoall(comm: MPI.Intracomm, t: torch.Tensor, *, direct: bool = False) -> torch.Tensor:
    """Collective: t of shape (ranks, ...) sends row j to rank j; returns (ranks, ...)
    whose row i came from rank i (any dtype, bit for bit; on t's device, CUDA tensors as
    allgather)."""
    size = comm.Get_size()
    if t.dim() == 0 or t.shape[0] != size:
        raise ValueError(f"alltoall needs a tensor of shape (ranks={size}, ...), not {tuple(t.shape)}")
    t = t.detach().contiguous()
    return _exchange(comm, comm.Alltoall, t, t.numel() // size, direct).reshape(t.shape)


def bcast_(comm: MPI.Intracomm, t: torch.Tensor, root: int = 0, *, direct: bool = False) -> torch.Tensor:
    """Collective: in-place broadcast of a contiguous tensor from `root` (any dtype, bit for
    bit); CUDA tensors as allreduce_ (direct only on the agreed path, else staged)."""
    if not t.is_contiguous():
        raise ValueError("bcast_ needs a contiguous tensor")
    if comm.Get_rank() == root:
        TRAFFIC.add(t.numel() * t.element_size())
    words, datatype = _words(t)
    st = None
    if t.is_cuda and direct:
        torch.cuda.current_stream(t.device).synchronize()
        mem = words
    elif t.is_cuda:
        st = stager_for(words)
        mem = (st.to_host(words) if comm.Get_rank() == root else st.writable()).numpy()
    else:
        mem = words.numpy()
    for lo, hi in counts.chunks(len(mem)):
        comm.Bcast([mem[lo:hi], datatype], root=root)
    if st is not None:
        st.to_device(words)
    return t


def broadcast_module(comm: MPI.Intracomm, model: torch.nn.Module, direct: bool = False) -> None:
    """Collective: every rank gets rank 0's parameters and buffers."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            flat = t.data.contiguous()
            bcast_(comm, flat, direct=direct)
            if flat.data_ptr() != t.data.data_ptr():
                t.data.copy_(flat)


# -- uneven chunks of a flat buffer (ZeRO): counts[r] values for rank r, contiguous ---------

def reduce_scatter_(comm: MPI.Intracomm, send: torch.Tensor, recv: torch.Tensor, counts: list[int]) -> None:
    """Collective: recv := rank r's chunk (counts[r] values, in order) of the sum over ranks
    of `send` (contiguous CPU tensors; every chunk below counts.MAX_COUNT)."""
    TRAFFIC.add(send.numel() * send.element_size())
    comm.Reduce_scatter(host_buffer(send), host_buffer(recv), counts, op=MPI.SUM)


def allgatherv_(comm: MPI.Intracomm, flat: torch.Tensor, counts: list[int], displs: list[int]) -> None:
    """Collective: in place, every rank's chunk flat[displs[r]:displs[r] + counts[r]] from
    its owner (a contiguous CPU tensor)."""
    TRAFFIC.add(counts[comm.Get_rank()] * flat.element_size())
    comm.Allgatherv(MPI.IN_PLACE, [flat.numpy(), counts, displs, mpi_dtype(flat)])

