"""MPI counts are C ints: one limit on the elements of an MPI call, and the pieces that
keep every call below it (no torch here)."""

from __future__ import annotations

import os

from ..errors import UserError

INT_MAX = 2**31 - 1


def _count_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return INT_MAX
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= INT_MAX:
        raise UserError(f"MPITRAIN_MAX_COUNT={raw!r}: expected an integer from 1 to {INT_MAX} "
                        "(a test-only limit on the elements of one MPI call)")
    return value


# Elements per MPI call at most; larger buffers go in several calls. MPITRAIN_MAX_COUNT
# lowers it for tests only; it must be the same on every rank (the ranks must make the
# same calls).
MAX_COUNT = _count_limit(os.environ.get("MPITRAIN_MAX_COUNT"))


def chunks(n: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most MAX_COUNT elements covering range(n), in order (none for n = 0)."""
    step = MAX_COUNT
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def row_block(datatype, count: int, row: int):
    """A committed MPI datatype of `count` elements of `datatype` whose extent is `row`
    elements (the caller frees it): in an Allgather or Alltoall, rank i's block then lands
    i rows further on."""
    block = datatype.Create_contiguous(count)
    resized = block.Create_resized(0, row * datatype.Get_extent()[1])
    block.Free()
    resized.Commit()
    return resized


def by_rows(collective, send, recv, datatype, row: int) -> None:
    """collective(sendbuf, recvbuf), Allgather or Alltoall, of `row` elements per rank
    (Allgather: send is one row), in pieces of at most MAX_COUNT columns of every row:
    piece [lo, hi) of each rank's row lands in the same columns of its row of recv.
    send/recv: flat numpy arrays or CUDA tensors."""
    if row <= MAX_COUNT:
        if row:
            collective([send, row, datatype], [recv, row, datatype])
        return
    for lo, hi in chunks(row):
        block = row_block(datatype, hi - lo, row)
        try:
            collective([send[lo:], 1, block], [recv[lo:], 1, block])
        finally:
            block.Free()


def allreduce_chunks(comm, flat, datatype, op, via=None) -> None:
    """In-place allreduce of a flat buffer (numpy array or CUDA tensor) in MAX_COUNT
    pieces; `via.allreduce_(buf)` instead of comm.Allreduce where given."""
    from mpi4py import MPI

    for lo, hi in chunks(len(flat)):
        buf = [flat[lo:hi], datatype]
        if via is not None:
            via.allreduce_(buf)
        else:
            comm.Allreduce(MPI.IN_PLACE, buf, op=op)
