"""Parameter-sharing strategies, one per module, behind the protocol in base.py."""

from . import allreduce, bmuf, easgd, local_sgd, ps  # noqa: F401  (they register themselves)
from .base import REGISTRY, Reporting, Stateful, Strategy, create, register, roles

__all__ = ["REGISTRY", "Reporting", "Stateful", "Strategy", "create", "register", "roles"]
