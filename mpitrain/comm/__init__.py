"""The only package that moves tensors through MPI."""

from .world import World

__all__ = ["World"]
