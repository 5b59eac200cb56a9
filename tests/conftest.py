"""Shared fixtures for every test folder (tests/comm, tests/sync, tests/data, tests/cli, ...).

Tests marked `mpi` run in-process under `mpiexec -n N python -m mpi4py -m pytest --with-mpi`
at any N; tests marked `launcher` spawn their own mpiexec jobs (plain pytest); tests marked
`slurm` submit jobs/*.sbatch to a local Slurm. Helpers that tests share are fixtures here,
so no test module imports another (or this file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # one private basetemp per MPI rank: ranks must not share or clean each other's tmp_path
    rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
                 if v in os.environ), None)
    if rank is not None and config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix=f"pytest-mpitrain-r{rank}-")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (job files, scripts), the working directory of launched jobs."""
    return ROOT


# -- in-process MPI (pytest --with-mpi) ---------------------------------------------------

@pytest.fixture(scope="session")
def world():
    """The job's World, its device selected as `mpitrain train` selects it: on a GPU node
    this rank's GPU is the current CUDA device and the CUDA path is agreed (direct where
    every rank's MPI is CUDA-aware, e.g. MPITRAIN_CUDA_AWARE=1; else staged)."""
    from mpitrain.comm import World

    w = World.create()
    w.select_device("auto")
    _AGREED_PATH[id(w)] = w.direct_cuda
    return w


_AGREED_PATH: dict[int, bool] = {}


@pytest.fixture(autouse=True)
def _agreed_cuda_path(request):
    """Every test that uses `world` starts on the session's agreed CUDA path (a cuda_path
    probe or a test of the agreement itself changes world.direct_cuda for the rest)."""
    if "world" in request.fixturenames:
        w = request.getfixturevalue("world")
        w.direct_cuda = _AGREED_PATH[id(w)]
    yield


@pytest.fixture
def shared_tmp(world):
    """A temporary folder that every rank sees (rank 0 makes it, the path is broadcast)."""
    path = tempfile.mkdtemp(prefix="mpitrain-test-") if world.is_root else None
    path = Path(world.bcast(path))
    yield path
    world.barrier()
    if world.is_root:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_h5(world):
    """data/digits/digits.h5 made fresh for the session (shared by all ranks)."""
    path = tempfile.mkdtemp(prefix="mpitrain-digits-") if world.is_root else None
    path = Path(world.bcast(path)) / "digits.h5"
    if world.is_root:
        from mpitrain.data.prepare import digits

        digits(str(path))
    world.barrier()
    yield path
    world.barrier()
    if world.is_root:
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def make_cfg():
    """make_cfg(run_dir, data_path, **sections): a Config with test-friendly defaults plus
    `section={key: value}` overrides. The sync section is nested like the TOML file:
    sync={"strategy": "ssp", "ssp": {"staleness": 2}}."""
    from mpitrain import config

    def make(run_dir, data_path, **sections):
        raw = {"data": {"path": str(data_path)}, "train": {"progress": False, "epochs": 1, "resume": "never"},
               "output": {"dir": str(run_dir), "name": "t"}}
        for sec, kv in sections.items():
            raw.setdefault(sec, {}).update(kv)
        return config.from_dict(raw, "<test>")
    return make


@pytest.fixture
def run_digits(world, shared_tmp, digits_h5, make_cfg):
    """run_digits(name, strategy, options=None, *, world=None, **sections) -> (row, flat params).

    Trains a small job on digits in shared_tmp/name: an MLP (hidden [32]), SGD (lr 0.05,
    momentum 0.9, weight decay 1e-4), batch 8, 10 steps of at most 2 epochs, unless a
    section overrides it. `options` is the strategy's own table [sync.<strategy>]. On a
    rank the strategy keeps for itself (a dedicated server) it returns ({}, None)."""
    import torch

    from mpitrain.train import train

    default_world = world

    def run(name, strategy, options=None, *, world=None, **sections):
        w = world or default_world
        sections.setdefault("model", {"name": "mlp", "hidden": [32]})
        sections.setdefault("optim", {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4})
        sections.setdefault("train", {"batch_size": 8, "max_steps": 10, "epochs": 2})
        sections["sync"] = {"strategy": strategy, strategy: dict(options or {})}
        cfg = make_cfg(shared_tmp / name, digits_h5, **sections)
        row, model = train(cfg, w, w.logger())
        if model is None:  # a dedicated server rank
            return row, None
        return row, torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return run


@pytest.fixture(scope="session")
def wait_for():
    """wait_for(pred, timeout, what): poll pred every 0.2 s; seconds it took, or an
    AssertionError naming `what` after `timeout` s (for jobs and files of other processes)."""
    import time

    def wait(pred, timeout, what):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if pred():
                return time.monotonic() - t0
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return wait


# -- launched jobs (pytest -m launcher) -----------------------------------------------------

class Launcher:
    """Starts `mpiexec -n N python -m mpi4py ...` jobs from the repository root, with the
    environment scripts/mpienv.sh sets (root allowed, oversubscription, idle ranks yield)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                        OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
                        OMPI_MCA_orte_execute_quiet="1", PYTHONUNBUFFERED="1")

    def command(self, np_, *args, script=None) -> list[str]:
        """`python -m mpi4py -m mpitrain ARGS` on np_ ranks (or `python -m mpi4py SCRIPT ARGS`)."""
        target = [str(script)] if script is not None else ["-m", "mpitrain"]
        return ["mpiexec", "-n", str(np_), sys.executable, "-m", "mpi4py", *target, *map(str, args)]

    def __call__(self, np_, *args, timeout=120, cwd=None, script=None) -> subprocess.CompletedProcess:
        """Run the job to its end; stdout and stderr captured as text."""
        return subprocess.run(self.command(np_, *args, script=script), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd or self.root, env=self.env)

    def spawn(self, np_, *args, script=None) -> subprocess.Popen:
        """Start the job and return at once (stdout and stderr piped as text)."""
        return subprocess.Popen(self.command(np_, *args, script=script), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.root, env=self.env)


@pytest.fixture(scope="session")
def mpirun(repo_root) -> Launcher:
    """mpirun(np_, *args, timeout=120, cwd=None, script=None) runs `mpitrain ARGS` on np_
    ranks; mpirun.spawn(...) starts it in the background; mpirun.env is its environment."""
    return Launcher(repo_root)
