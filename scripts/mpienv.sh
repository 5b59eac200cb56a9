# Sourced by demo.sh / test.sh: environment for launching Open MPI jobs on a workstation
# or CI box (root allowed, more ranks than cores allowed, idle ranks yield the CPU).
# On a cluster, your site's launcher settings apply instead (see README).
if mpiexec --version 2>/dev/null | grep -qiE "open ?mpi|openrte"; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  export OMPI_MCA_rmaps_base_oversubscribe=1     # = mpiexec --oversubscribe (np > cores)
  export OMPI_MCA_mpi_yield_when_idle=1          # oversubscribed ranks must not spin
  export OMPI_MCA_orte_execute_quiet=1           # no multi-line banner after a clean exit 2
fi
export PYTHONUNBUFFERED=1
