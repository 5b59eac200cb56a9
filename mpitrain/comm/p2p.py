"""Point-to-point tensors that carry their own header (pipeline stages), and the
communicators of a grid of ranks.

A message is one MPI_BYTE buffer: a header of 8 int64 (dtype code, ndim, up to 6 dims;
code -1: the rest is an error message) and the tensor's bytes. It is received with
MPI_Mprobe / MPI_Mrecv, so its size is learnt from the message: nothing is agreed in
advance, shapes may change from message to message.
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from ..errors import AgreedError, UserError
from . import buffers

HEADER = 8
CODES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
         torch.bool]


class PeerError(AgreedError):
    """A peer sent an error in place of the message (it failed; so does this rank)."""


def isend(comm: MPI.Intracomm, t: torch.Tensor, dest: int, tag: int):
    """Start sending t with its header; a handle for `wait_all` (it keeps the buffer)."""
    t = t.detach().contiguous().cpu()
    if t.dtype not in CODES or t.dim() > HEADER - 2:
        raise UserError(f"cannot send a {t.dtype} tensor of {t.dim()} dims between ranks")
    head = np.zeros(HEADER, np.int64)
    head[0], head[1], head[2:2 + t.dim()] = CODES.index(t.dtype), t.dim(), list(t.shape)
    buf = np.concatenate([head.view(np.uint8), t.reshape(-1).view(torch.uint8).numpy()])
    buffers.TRAFFIC.add(buf.size)
    return comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag), buf


def send_error(comm: MPI.Intracomm, message: str, dest: int, tag: int):
    """Start sending `message` in place of a tensor: the receiver raises PeerError."""
    head = np.zeros(HEADER, np.int64)
    head[0] = -1
    buf = np.concatenate([head.view(np.uint8), np.frombuffer(message.encode(), np.uint8)])
    return comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag), buf


def recv(comm: MPI.Intracomm, source: int, tag: int) -> torch.Tensor:
    """Receive a tensor sent by `isend`; PeerError where an error came instead."""
    status = MPI.Status()
    msg = comm.Mprobe(source=source, tag=tag, status=status)
    buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
    msg.Recv([buf, MPI.BYTE])
    head = buf[:HEADER * 8].view(np.int64)
    if head[0] == -1:
        raise PeerError(buf[HEADER * 8:].tobytes().decode(errors="replace"))
    if not 0 <= head[0] < len(CODES) or not 0 <= head[1] <= HEADER - 2:
        raise UserError(f"a message from rank {source} has a bad header")
    dtype, shape = CODES[int(head[0])], [int(d) for d in head[2:2 + int(head[1])]]
    return torch.from_numpy(buf[HEADER * 8:].copy()).view(dtype).reshape(shape)


def wait_all(handles) -> None:
    """Complete the sends `isend` / `send_error` started."""
    MPI.Request.Waitall([r for r, _ in handles])


def grid(comm: MPI.Intracomm, inner: int):
    """Collective: (the row, the column) of a (size / inner) x inner grid of comm's ranks
    (MPI_Cart_create; rank = row * inner + column: a row's ranks are consecutive, on one
    node where they fit)."""
    cart = comm.Create_cart([comm.Get_size() // inner, inner], periods=[False, False], reorder=False)
    row, column = cart.Sub([False, True]), cart.Sub([True, False])
    cart.Free()
    return row, column


def subgroup(comm: MPI.Intracomm, member: bool):
    """Collective over comm: a communicator of the members (None on the others)."""
    group = comm.Split(0 if member else MPI.UNDEFINED, comm.Get_rank())
    return group if member else None
