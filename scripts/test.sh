#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite:
#   1. in-process MPI tests at world sizes 1, 2, 3 and 4 (mpiexec ... python -m mpi4py -m pytest --with-mpi)
#   2. launcher tests that spawn their own mpiexec jobs at 1, 2 and 4 ranks (plain pytest)
#   3. Slurm tests: jobs/*.sbatch on a local single-node Slurm (scripts/slurm-local.sh)
#   4. virtual-cluster tests: multi-node jobs on 2 nodes x 2 CPUs with 1 Gbit/s NICs
#      (scripts/vcluster.sh; needs root, skipped with one line where the machine refuses it)
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
  timeout -k 10 1200 mpiexec -n "$np" python -m mpi4py -m pytest --with-mpi -m "not launcher and not slurm and not vcluster" \
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

echo "[test] ==== virtual-cluster tests (2 nodes x 2 CPUs, 1 Gbit/s NICs, scripts/vcluster.sh) ===="
t0=$SECONDS
set +e
vc_out=$(bash scripts/vcluster.sh up --nodes 2 --cpus-per-node 2 --rate 1gbit)
rc=$?
echo "$vc_out"
if [ "$rc" -eq 3 ]; then  # vcluster.sh's "this machine does not permit it" (not root, no netns)
  echo "[test] virtual-cluster tests: SKIPPED (the machine does not permit scripts/vcluster.sh, see above)"
  rc=0
elif [ "$rc" -eq 0 ]; then
  export SLURM_CONF=$(sed -n 's/^export SLURM_CONF=//p' <<< "$vc_out")
  timeout -k 10 600 python -m pytest -m vcluster "${COMMON[@]}" --timeout=400 tests
  rc=$?
  bash scripts/vcluster.sh down || rc=1
  check "virtual-cluster tests" "$rc"
else
  check "virtual-cluster tests (vcluster.sh up)" "$rc"
fi
set -e
took[vcluster]=$((SECONDS - t0))

echo "[test] times (s): $(for k in "${!took[@]}"; do printf '%s=%s ' "$k" "${took[$k]}"; done)"
[ "$status" -eq 0 ] && echo "[test] all suites passed" || echo "[test] SOME SUITES FAILED" >&2
exit "$status"
