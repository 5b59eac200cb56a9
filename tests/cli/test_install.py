"""`pip install` of a built wheel into a fresh virtual environment: a working `mpitrain`
command and `import mpitrain`, and tests passing against the installed package, not the
source tree. Offline: the wheel is built from this tree, and the fresh environment takes
torch, h5py and mpi4py from the project's .venv through PYTHONPATH (which imports packages
but does not run that environment's .pth files, so its editable mpitrain stays out)."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.launcher


@pytest.mark.timeout(600)
def test_a_built_wheel_installs_and_passes_tests_outside_the_source_tree(tmp_path, repo_root, mpirun):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(dist), str(repo_root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(dist.glob("mpitrain-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, pip = venv / "bin" / "python", venv / "bin" / "pip"
    r = subprocess.run([str(pip), "install", "-q", "--no-deps", "--no-index", str(wheel)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    deps = site.getsitepackages()[0]  # the project's .venv: torch, h5py, mpi4py, ...
    env = dict(mpirun.env, PYTHONPATH=deps)
    env.pop("VIRTUAL_ENV", None)
    away = tmp_path / "elsewhere"
    shutil.copytree(repo_root / "tests", away / "tests")
    shutil.copy(repo_root / "setup.cfg", away / "setup.cfg")  # (pytest's markers and options only)
    where = subprocess.run([str(py), "-c", "import mpitrain; print(mpitrain.__file__)"], capture_output=True,
                           text=True, cwd=away, env=env, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    r = subprocess.run([str(venv / "bin" / "mpitrain"), "config", "--keys"], capture_output=True, text=True,
                       cwd=away, env=env, timeout=120)
    assert r.returncode == 0 and "`strategy`" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]
    r = subprocess.run(["mpiexec", "-n", "2", str(py), "-m", "mpi4py", "-m", "pytest", "--with-mpi", "-q",
                        "--timeout=200", "--timeout-method=thread", "tests/test_schedule.py", "tests/test_export.py",
                        "tests/test_checkpoint.py"], capture_output=True, text=True, cwd=away, env=env,
                       timeout=500)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert not os.path.exists(away / "mpitrain")
