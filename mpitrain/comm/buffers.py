"""torch tensor <-> MPI buffer: dtype allow-list, CUDA-aware detection, pinned-host staging.

Open MPI has no MPI datatype for float16 (MPI_ERR_TYPE) and reduces bfloat16 bytes as
another type (wrong sums, silently), so half-precision tensors are reduced in float32 and
cast back. A CUDA tensor is handed to MPI only when the library is CUDA-aware; otherwise
it is staged through a pinned host buffer (a non-CUDA-aware Open MPI segfaults on a device
pointer); the job agrees on one path for every transfer (World.select_device).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading

import torch
from mpi4py import MPI


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
    """Pinned host mirror of one device tensor for MPI on a non-CUDA-aware library, with
    copies on a side stream ordered against the tensor's producers and consumers."""

    def __init__(self, like: torch.Tensor):
        dtype = torch.float32 if like.dtype in VIA_FLOAT32 else like.dtype
        self.host = torch.empty(like.numel(), dtype=dtype, pin_memory=like.is_cuda)
        self.stream = torch.cuda.Stream(like.device) if like.is_cuda else None

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
        self.stream.synchronize()  # MPI reads the host buffer next
        return self.host

    def to_device(self, t: torch.Tensor) -> None:
        """t := the host copy, after the kernels queued on t so far (no write under a
        pending read); later kernels of this thread's current stream see the new values."""
        if self.stream is None:
            t.reshape(-1).copy_(self.host)
            return
        current = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            t.reshape(-1).copy_(self.host, non_blocking=True)
        current.wait_stream(self.stream)
        self.stream.synchronize()  # the host buffer may be overwritten by the next call


_STAGERS: dict = {}
_STAGERS_LOCK = threading.Lock()


def stager_for(t: torch.Tensor) -> Stager:
    """A cached Stager for tensors like t (device, dtype, size): pinned memory is costly
    to allocate, and a job reduces the same shapes every step."""
    key = (t.device, t.dtype, t.numel())
    with _STAGERS_LOCK:
        if key not in _STAGERS:
            _STAGERS[key] = Stager(t)
        return _STAGERS[key]


def allreduce_(comm: MPI.Intracomm, t: torch.Tensor, *, direct: bool = False, stager: Stager | None = None,
               ready: "torch.cuda.Event | None" = None, count: bool = True, via=None) -> torch.Tensor:
    """Collective: in-place SUM allreduce of a contiguous tensor of any allowed dtype/device.

    float16/bfloat16 go through float32. A CUDA tensor goes to MPI as a device buffer only
    with `direct` (the job's agreed path, World.direct_cuda), else through a pinned host
    buffer (`stager`, default a cached one). `ready`: an event after which t is complete
    (default: everything queued on this thread's current stream). `via`: an object whose
    `allreduce_(buf)` does the sum instead of comm.Allreduce (e.g. a NodeHierarchy).
    """
    def reduce(buf):
        if via is not None:
            via.allreduce_(buf)
        else:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    if not t.is_contiguous():
        raise ValueError("allreduce_ needs a contiguous tensor")
    if count:
        TRAFFIC.add(t.numel() * (4 if t.dtype in VIA_FLOAT32 else t.element_size()))
    if t.is_cuda and direct and t.dtype not in VIA_FLOAT32:
        if ready is not None:
            ready.synchronize()
        else:
            torch.cuda.current_stream(t.device).synchronize()
        reduce(device_buffer(t))
        return t
    if t.is_cuda or t.dtype in VIA_FLOAT32:  # through a host (float32) mirror
        st = stager or stager_for(t)
        reduce(host_buffer(st.to_host(t, ready)))
        st.to_device(t)
        return t
    reduce(host_buffer(t))
    return t


def _bytes_on_host(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as a contiguous uint8 CPU tensor (a view where t is already one)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def allgather(comm: MPI.Intracomm, t: torch.Tensor) -> torch.Tensor:
    """Collective: every rank's t (same shape and dtype everywhere, any dtype: moved as
    bytes), stacked to (ranks, *t.shape) on t's device."""
    send = _bytes_on_host(t)
    TRAFFIC.add(send.numel())
    recv = torch.empty(comm.Get_size() * send.numel(), dtype=torch.uint8)
    comm.Allgather(host_buffer(send), host_buffer(recv))
    return recv.view(t.dtype).reshape(comm.Get_size(), *t.shape).to(t.device)


def alltoall(comm: MPI.Intracomm, t: torch.Tensor) -> torch.Tensor:
    """Collective: t of shape (ranks, ...) sends row j to rank j; returns (ranks, ...)
    whose row i came from rank i (bytes, any dtype; on t's device)."""
    send = _bytes_on_host(t)
    TRAFFIC.add(send.numel())
    recv = torch.empty_like(send)
    comm.Alltoall(host_buffer(send), host_buffer(recv))
    return recv.view(t.dtype).reshape(t.shape).to(t.device)


def bcast_(comm: MPI.Intracomm, t: torch.Tensor, root: int = 0, *, direct: bool = False) -> torch.Tensor:
    """Collective: in-place broadcast of a contiguous tensor from `root` (bytes, so any
    dtype); CUDA tensors as allreduce_ (direct only on the agreed path, else staged)."""
    if comm.Get_rank() == root:
        TRAFFIC.add(t.numel() * t.element_size())
    flat = t.reshape(-1).view(torch.uint8)
    if t.is_cuda and direct:
        torch.cuda.current_stream(t.device).synchronize()
        comm.Bcast(device_buffer(flat), root=root)
        return t
    if t.is_cuda:
        st = stager_for(flat)
        comm.Bcast(host_buffer(st.to_host(flat)), root=root)
        st.to_device(flat)
        return t
    comm.Bcast(host_buffer(flat), root=root)
    return t


def broadcast_module(comm: MPI.Intracomm, model: torch.nn.Module, direct: bool = False) -> None:
    """Collective: every rank gets rank 0's parameters and buffers."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            flat = t.data.contiguous()
            bcast_(comm, flat, direct=direct)
            if flat.data_ptr() != t.data.data_ptr():
                t.data.copy_(flat)
