"""Gradient compressors for the allreduce strategy: a registry (base.py) of per-bucket
compressors, one module each, selected by `[sync.allreduce.compress] kind` (spec.py).
The import order below is the registry's order (and `mpitrain bench model`'s rows)."""

from . import half  # noqa: F401  fp16, bf16 (they register themselves)
from . import topk  # noqa: F401
from . import powersgd  # noqa: F401
from . import sign  # noqa: F401
from .base import REGISTRY, Compressor, Wire, register
from .spec import Compress

__all__ = ["REGISTRY", "Compress", "Compressor", "Wire", "register"]
