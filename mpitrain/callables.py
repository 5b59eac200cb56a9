"""User code named by a job file: 'package.module:attribute' (model.factory, train.loss),
imported from the job file's folder first, then PYTHONPATH. No MPI here."""

from __future__ import annotations

import importlib
import sys

from .errors import UserError


def resolve(spec: str, key: str, job_dir: str = ""):
    """The object named 'package.module:attribute', imported from the job file's folder
    first, then PYTHONPATH. Only a job file (or the command line) names what is imported."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UserError(f"{key}: expected 'package.module:function', got {spec!r}")
    added = bool(job_dir) and job_dir not in sys.path
    if added:
        sys.path.insert(0, job_dir)
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - any import-time failure is the user's to fix
        raise UserError(f"{key} = {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    finally:
        if added:
            sys.path.remove(job_dir)
    if not callable(obj):
        raise UserError(f"{key} = {spec!r}: not callable ({type(obj).__name__})")
    return obj
