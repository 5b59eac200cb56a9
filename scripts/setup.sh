#!/usr/bin/env bash
# Idempotent bootstrap for mpitrain on Debian 12 / Ubuntu 24.04:
#   system packages (Open MPI, parallel HDF5) -> .venv -> mpi4py (binary wheel)
#   -> h5py built against parallel HDF5 (wheel cached) -> CPU torch -> mpitrain (editable).
# A second run with nothing changed only verifies the environment (a few seconds).
# Env: MPITRAIN_VENV (default .venv), MPITRAIN_TORCH (default torch==2.13.0),
#      MPITRAIN_TORCH_INDEX (a pip index URL for torch, e.g. PyTorch's CPU wheels),
#      MPITRAIN_CACHE (default ~/.cache/mpitrain), MPITRAIN_SKIP_APT=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${MPITRAIN_VENV:-$ROOT/.venv}
CACHE=${MPITRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpitrain}
TORCH_SPEC=${MPITRAIN_TORCH:-torch==2.13.0}
H5PY_SPEC=${MPITRAIN_H5PY:-h5py==3.14.*}
say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
t0=$SECONDS

# ---- 1. system packages ---------------------------------------------------------
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
for p in openmpi-bin libopenmpi-dev libhdf5-openmpi-dev hdf5-tools pkg-config; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
command -v cc >/dev/null || need+=(build-essential)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=(python3-dev)
# Fashion-MNIST's IDX files for `mpitrain data fashion-mnist` (and its tests): a data
# package of Debian 12 / Ubuntu 24.04, installed when apt offers it
if ! dpkg-query -W -f='${Status}' dataset-fashion-mnist 2>/dev/null | grep -q "install ok installed" \
   && [ "${MPITRAIN_SKIP_APT:-0}" != 1 ]; then
  apt-cache show dataset-fashion-mnist >/dev/null 2>&1 || $SUDO apt-get update -qq || true
  if apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
    need+=(dataset-fashion-mnist)
  else
    say "apt offers no dataset-fashion-mnist: mpitrain data fashion-mnist will need --from DIR"
  fi
fi
if [ ${#need[@]} -gt 0 ]; then
  [ "${MPITRAIN_SKIP_APT:-0}" = 1 ] && die "missing system packages: ${need[*]} (MPITRAIN_SKIP_APT=1 set)"
  say "installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  say "system packages present (Open MPI $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}'), HDF5 $(pkg-config --modversion hdf5-openmpi))"
fi

# ---- 2. virtual environment -----------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  say "creating $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() {  # quiet pip; drop this machine's warnings about absent local index folders
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}
PIP=(pip_install)
stamp="$VENV/.mpitrain-setup"
want=$(cat setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC-$H5PY_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "venv up to date ($VENV)"
else
  say "installing build tools and mpi4py (binary wheel)"
  "${PIP[@]}" --upgrade pip "setuptools>=77" wheel "Cython>=3" pkgconfig "numpy>=1.24,<3"
  "${PIP[@]}" --only-binary=mpi4py "mpi4py>=4.1,<4.2"

  # ---- 3. h5py against parallel HDF5, built once per HDF5 version, wheel cached -----
  if ! "$PY" -c 'import h5py, sys; sys.exit(not h5py.get_config().mpi)' 2>/dev/null; then
    hv=$(pkg-config --modversion hdf5-openmpi) || die "pkg-config cannot find hdf5-openmpi"
    whl_dir="$CACHE/wheels/hdf5-openmpi-$hv-py$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
    mkdir -p "$whl_dir"
    if ! ls "$whl_dir"/h5py-*.whl >/dev/null 2>&1; then
      say "building h5py against parallel HDF5 $hv (takes ~4 min once; cached in $whl_dir)"
      CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi \
        "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary=h5py "$H5PY_SPEC" -w "$whl_dir" \
          2> >(grep -v "^WARNING: Location 'file:" >&2)
    fi
    say "installing h5py from $whl_dir"
    "${PIP[@]}" --force-reinstall --no-deps "$whl_dir"/h5py-*.whl
  fi

  # ---- 4. torch (CPU build where available) and the package ---------------------------
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    say "installing $TORCH_SPEC${MPITRAIN_TORCH_INDEX:+ from $MPITRAIN_TORCH_INDEX}"
    # PyPI's Linux torch wheels carry CUDA; set MPITRAIN_TORCH_INDEX to PyTorch's CPU wheel
    # index for the small CPU build (a local +cpu wheel in pip's find-links is preferred anyway)
    "${PIP[@]}" ${MPITRAIN_TORCH_INDEX:+--extra-index-url "$MPITRAIN_TORCH_INDEX"} "$TORCH_SPEC"
  fi
  say "installing mpitrain (editable) with test, data and tensorboard extras"
  "${PIP[@]}" --no-build-isolation -e ".[test,data,tensorboard]"
  echo "$want" > "$stamp"
fi

# ---- 5. verify --------------------------------------------------------------------
"$PY" - <<'PY' || die "environment check failed (see above)"
import sys
import h5py, mpi4py, torch, numpy
if not h5py.get_config().mpi:
    sys.exit("[setup] error: h5py is not built against parallel HDF5 (h5py.get_config().mpi is False); "
             "remove the cached wheel under ~/.cache/mpitrain/wheels and rerun")
import mpitrain
print(f"[setup] ok: python {sys.version.split()[0]}, mpi4py {mpi4py.__version__}, h5py {h5py.__version__} "
      f"(parallel HDF5 {h5py.version.hdf5_version}), torch {torch.__version__}, numpy {numpy.__version__}")
PY
say "done in $((SECONDS - t0)) s; activate with: . $VENV/bin/activate"
