"""Parameter-sharing strategies, one per module, behind the protocol in base.py."""

from . import allreduce, bmuf, easgd, local_sgd, ps, zero  # noqa: F401  (they register themselves)
from .base import REGISTRY, NoSync, Reporting, Stateful, Strategy, create, register, roles

__all__ = ["REGISTRY", "NoSync", "Reporting", "Stateful", "Strategy", "create", "register", "roles"]
