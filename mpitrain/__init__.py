"""mpitrain: data-parallel PyTorch training over MPI with parallel-HDF5 data."""

from ._version import __version__

__all__ = ["__version__"]


def __getattr__(name):  # lazy: `import mpitrain` stays cheap and does not initialise MPI
    if name == "kvstore":
        from .sync import kvstore

        return kvstore
    if name == "World":
        from .comm import World

        return World
    if name == "pipeline":
        from .parallel.pipeline import pipeline

        return pipeline
    if name == "load_model":
        from .export import load_model

        return load_model
    if name in ("init", "distribute", "Loader", "save", "restore", "DistributedOptimizer"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
