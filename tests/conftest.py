"""Shared fixtures. Tests marked `mpi` run in-process under `mpiexec -n N python -m mpi4py
-m pytest --with-mpi` at any N; tests marked `launcher` spawn their own mpiexec jobs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def world():
    from mpitrain.comm import World

    return World.create()


@pytest.fixture
def shared_tmp(world):
    """A temporary folder that every rank sees (rank 0 makes it, the path is broadcast)."""
    path = tempfile.mkdtemp(prefix="mpitrain-test-") if world.is_root else None
    path = Path(world.comm.bcast(path, root=0))
    yield path
    world.comm.Barrier()
    if world.is_root:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_h5(world, tmp_path_factory):
    """data/digits/digits.h5 made fresh for the session (shared by all ranks)."""
    path = tempfile.mkdtemp(prefix="mpitrain-digits-") if world.is_root else None
    path = Path(world.comm.bcast(path, root=0)) / "digits.h5"
    if world.is_root:
        from mpitrain.data.prepare import digits

        digits(str(path))
    world.comm.Barrier()
    yield path
    world.comm.Barrier()
    if world.is_root:
        shutil.rmtree(path.parent, ignore_errors=True)


def make_cfg(run_dir, data_path, **sections):
    """A Config with test-friendly defaults plus `section={key: value}` overrides."""
    from mpitrain import config

    raw = {"data": {"path": str(data_path)}, "train": {"progress": False, "epochs": 1, "resume": "never"},
           "output": {"dir": str(run_dir), "name": "t"}}
    for sec, kv in sections.items():
        raw.setdefault(sec, {}).update(kv)
    return config.from_dict(raw, "<test>")


def pytest_configure(config):
    # one private basetemp per MPI rank: ranks must not share or clean each other's tmp_path
    rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
                 if v in os.environ), None)
    if rank is not None and config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix=f"pytest-mpitrain-r{rank}-")
