"""The only package that talks to MPI: the World, tensor buffers and collectives, RMA."""

from .world import World, shard_bounds

__all__ = ["World", "shard_bounds"]
