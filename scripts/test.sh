#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite:
#   1. in-process MPI tests at world sizes 1, 2, 3 and 4 (mpiexec ... python -m mpi4py -m pytest --with-mpi)
#   2. launcher tests that spawn their own mpiexec jobs at 1, 2 and 4 ranks (plain pytest)
# Env: NPS="1 2 3 4" world sizes; PYTEST_ARGS extra pytest arguments (e.g. "-k sampler").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. scripts/mpienv.sh
. .venv/bin/activate
NPS=${NPS:-1 2 3 4}
read -r -a EXTRA <<< "${PYTEST_ARGS:-}"
COMMON=(-q -ra --timeout=300 --timeout-method=thread "${EXTRA[@]}")
declare -A took
status=0

check() {  # check NAME RC: pytest's 5 (no tests collected) is a failure too
  local name=$1 rc=$2
  if [ "$rc" -eq 5 ]; then echo "[test] $name: no tests ran (pytest exit 5)" >&2; status=1
  elif [ "$rc" -ne 0 ]; then echo "[test] $name: FAILED (exit $rc)" >&2; status=1
  else echo "[test] $name: ok"; fi
}

for np in $NPS; do
  echo "[test] ==== MPI tests at np=$np ===="
  t0=$SECONDS
  set +e
  timeout -k 10 1200 mpiexec -n "$np" python -m mpi4py -m pytest --with-mpi -m "not launcher and not slurm" \
    "${COMMON[@]}" tests
  rc=$?
  set -e
  took[np$np]=$((SECONDS - t0))
  check "MPI tests np=$np" "$rc"
done

echo "[test] ==== launcher tests (spawn mpiexec at 1, 2, 4 ranks) ===="
t0=$SECONDS
set +e
timeout -k 10 1800 python -m pytest -m launcher "${COMMON[@]}" --timeout=900 tests
rc=$?
set -e
took[launcher]=$((SECONDS - t0))
check "launcher tests" "$rc"

echo "[test] ==== Slurm tests (jobs/*.sbatch on a local single-node Slurm) ===="
t0=$SECONDS
set +e
bash scripts/slurm-local.sh start
rc=$?
if [ "$rc" -eq 0 ]; then
  export SLURM_CONF=$PWD/.slurm/slurm.conf
  timeout -k 10 1800 python -m pytest -m slurm "${COMMON[@]}" --timeout=900 tests
  rc=$?
  bash scripts/slurm-local.sh stop
fi
set -e
took[slurm]=$((SECONDS - t0))
check "Slurm tests" "$rc"

echo "[test] times (s): $(for k in "${!took[@]}"; do printf '%s=%s ' "$k" "${took[$k]}"; done)"
[ "$status" -eq 0 ] && echo "[test] all suites passed" || echo "[test] SOME SUITES FAILED" >&2
exit "$status"
