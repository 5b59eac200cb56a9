"""The only package that talks to MPI: the World, tensor buffers and collectives, RMA."""

from .shards import shard_bounds
from .world import World

__all__ = ["World", "shard_bounds"]
