"""Collectives that tensor-parallel layers (mpitrain/parallel/tensor.py) need beyond
World.allreduce_ and World.allgather_tensor: an element-wise MAX allreduce of a tensor.

It goes through buffers.allreduce_ (its `via` hook does the reduction), so it takes the
same paths as the SUM: CPU tensors in place, CUDA tensors as device buffers on the agreed
direct path or through a pinned host mirror, float16/bfloat16 through float32 (exact for a
maximum), pieces of at most counts.MAX_COUNT elements; its bytes are counted in TRAFFIC.
"""

from __future__ import annotations

from mpi4py import MPI

from . import buffers


class _Max:
    """buffers.allreduce_'s `via`: MAX instead of SUM over one communicator."""

    def __init__(self, comm: MPI.Intracomm):
        self.comm = comm

    def allreduce_(self, buf) -> None:
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)


def allreduce_max_(world, t):
    """Collective over `world` (a World): in-place element-wise maximum over its ranks of a
    contiguous tensor (CPU or CUDA, a dtype buffers allows)."""
    if world.size == 1:
        return t
    return buffers.allreduce_(world.comm, t, direct=world.direct_cuda, via=_Max(world.comm))
