"""Parameter-sharing strategies, one per module, behind the protocol in base.py."""

from .base import REGISTRY, Strategy, create, register, roles
from . import allreduce, bmuf, easgd, local_sgd, ps  # noqa: F401  (they register themselves)

__all__ = ["REGISTRY", "Strategy", "create", "register", "roles"]
