"""Parameter-sharing strategies, one per module, behind the protocol in base.py."""

from .base import REGISTRY, Strategy, create, register
from . import allreduce  # noqa: F401  (registers itself)

__all__ = ["REGISTRY", "Strategy", "create", "register"]
