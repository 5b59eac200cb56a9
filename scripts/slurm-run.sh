#!/usr/bin/env bash
# The body of jobs/*.sbatch: run `mpitrain ARGS...` on the allocation's tasks and keep the
# preemption contract: Slurm's warning signal (USR1/TERM to this batch shell) is passed on
# to mpitrain, which checkpoints and exits 75; this script then requeues the job, and the
# requeued run resumes from the checkpoint. A finished (0) or failed (other) run is not requeued.
# Env: LAUNCH=srun (default: srun --mpi=pmix) | mpirun; MPITRAIN_SET="--set a.b=c ..." (train only).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
. .venv/bin/activate
. scripts/mpienv.sh
case "${LAUNCH:-srun}" in
  srun)   launcher=(srun --mpi=pmix --kill-on-bad-exit=1) ;;
  mpirun) launcher=(mpirun -n "${SLURM_NTASKS:?not inside a Slurm allocation}") ;;
  *) echo "slurm-run: LAUNCH must be srun or mpirun, not '$LAUNCH'" >&2; exit 2 ;;
esac
extra=()
[ "${1:-}" = train ] && read -r -a extra <<< "${MPITRAIN_SET:-}"
echo "[slurm-run] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${launcher[*]} python -m mpi4py -m mpitrain $* ${extra[*]}"
"${launcher[@]}" python -m mpi4py -m mpitrain "$@" "${extra[@]}" &
pid=$!
trap 'echo "[slurm-run] signal received: asking mpitrain to checkpoint and stop"; kill -USR1 "$pid" 2>/dev/null || true' USR1 TERM
while :; do  # `wait` returns early when a trapped signal arrives
  set +e; wait "$pid"; rc=$?; set -e
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$rc" -eq 75 ]; then
  echo "[slurm-run] checkpointed and stopped (exit 75): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[slurm-run] mpitrain exited with $rc"
exit "$rc"
