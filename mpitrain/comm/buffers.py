"""torch tensor <-> MPI buffer: dtype allow-list, CUDA-aware detection, pinned-host staging.

Open MPI has no MPI datatype for float16 (MPI_ERR_TYPE) and reduces bfloat16 bytes as
another type (wrong sums, silently), so half-precision tensors are reduced in float32 and
cast back. A CUDA tensor is handed to MPI only when the library is CUDA-aware; otherwise
it is staged through a pinned host buffer (a non-CUDA-aware Open MPI segfaults on a device
pointer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import subprocess
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
    """Whether the MPI library accepts CUDA device pointers.

    Order: MPITRAIN_CUDA_AWARE=0/1; MPIX_Query_cuda_support() (Open MPI) or
    MPIX_GPU_query_support(CUDA) (MPICH) from the loaded libmpi; `ompi_info` build flag.
    """
    env = os.environ.get("MPITRAIN_CUDA_AWARE")
    if env in ("0", "1"):
        return env == "1"
    lib = _libmpi()
    if lib is not None:
        if hasattr(lib, "MPIX_Query_cuda_support"):
            lib.MPIX_Query_cuda_support.restype = ctypes.c_int
            return bool(lib.MPIX_Query_cuda_support())
        if hasattr(lib, "MPIX_GPU_query_support"):
            ok = ctypes.c_int(0)
            if lib.MPIX_GPU_query_support(ctypes.c_int(0), ctypes.byref(ok)) == 0:  # 0 = CUDA
                return bool(ok.value)
    if shutil.which("ompi_info"):
        try:
            out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return "mpi_built_with_cuda_support:value:true" in out
    return False


def _libmpi():
    """The libmpi that mpi4py loaded (same handle), or None."""
    candidates = []
    try:  # the shared objects mapped into this process
        with open("/proc/self/maps") as f:
            candidates = sorted({line.split()[-1] for line in f if "libmpi.so" in line
                                 or "libmpich.so" in line})
    except OSError:
        pass
    name = ctypes.util.find_library("mpi")
    if name:
        candidates.append(name)
    for c in candidates:
        try:
            return ctypes.CDLL(c, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


class Stager:
    """Pinned host mirror of one device tensor for MPI on a non-CUDA-aware library."""

    def __init__(self, like: torch.Tensor):
        dtype = torch.float32 if like.dtype in VIA_FLOAT32 else like.dtype
        self.host = torch.empty(like.numel(), dtype=dtype, pin_memory=torch.cuda.is_available())
        self.stream = torch.cuda.Stream(like.device) if like.is_cuda else None

    def to_host(self, t: torch.Tensor, ready: "torch.cuda.Event | None" = None) -> torch.Tensor:
        if self.stream is None:
            self.host.copy_(t.reshape(-1))
            return self.host
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            self.host.copy_(t.reshape(-1), non_blocking=True)
        self.stream.synchronize()
        return self.host

    def to_device(self, t: torch.Tensor) -> None:
        if self.stream is None:
            t.reshape(-1).copy_(self.host)
            return
        with torch.cuda.stream(self.stream):
            t.reshape(-1).copy_(self.host, non_blocking=True)
        self.stream.synchronize()


def allreduce_(comm: MPI.Intracomm, t: torch.Tensor, *, direct_cuda: bool | None = None,
               stager: Stager | None = None, count: bool = True) -> torch.Tensor:
    """Collective: in-place SUM allreduce of a contiguous tensor of any allowed dtype/device.

    float16/bfloat16 go through float32; CUDA tensors go direct only when `direct_cuda`
    (default: the library is CUDA-aware), else through a pinned host buffer.
    """
    if not t.is_contiguous():
        raise ValueError("allreduce_ needs a contiguous tensor")
    if count:
        TRAFFIC.add(t.numel() * (4 if t.dtype in VIA_FLOAT32 else t.element_size()))
    if t.is_cuda:
        direct = cuda_aware() if direct_cuda is None else (direct_cuda and cuda_aware())
        if direct and t.dtype not in VIA_FLOAT32:
            torch.cuda.current_stream(t.device).synchronize()
            comm.Allreduce(MPI.IN_PLACE, device_buffer(t), op=MPI.SUM)
            return t
        st = stager or Stager(t)
        host = st.to_host(t)
        comm.Allreduce(MPI.IN_PLACE, host_buffer(host), op=MPI.SUM)
        st.to_device(t)
        return t
    if t.dtype in VIA_FLOAT32:
        tmp = t.to(torch.float32)
        comm.Allreduce(MPI.IN_PLACE, host_buffer(tmp), op=MPI.SUM)
        t.copy_(tmp)
        return t
    comm.Allreduce(MPI.IN_PLACE, host_buffer(t), op=MPI.SUM)
    return t


def bcast_(comm: MPI.Intracomm, t: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Collective: in-place broadcast of a contiguous tensor from `root`."""
    if comm.Get_rank() == root:
        TRAFFIC.add(t.numel() * t.element_size())
    if t.is_cuda and not cuda_aware():
        host = t.detach().cpu()
        comm.Bcast(host_buffer(host.reshape(-1).view(torch.uint8)), root=root)
        t.copy_(host)
        return t
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
        comm.Bcast(device_buffer(t.reshape(-1).view(torch.uint8)), root=root)
        return t
    comm.Bcast(host_buffer(t.reshape(-1).view(torch.uint8)), root=root)
    return t


def broadcast_module(comm: MPI.Intracomm, model: torch.nn.Module) -> None:
    """Collective: every rank gets rank 0's parameters and buffers."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            flat = t.data.contiguous()
            bcast_(comm, flat)
            if flat.data_ptr() != t.data.data_ptr():
                t.data.copy_(flat)
