#!/usr/bin/env bash
# A single-node Slurm (munge + slurmctld + slurmd, no systemd) for tests and demos.
#   bash scripts/slurm-local.sh start    # installs packages if missing, starts, waits for an idle node
#   bash scripts/slurm-local.sh status
#   bash scripts/slurm-local.sh stop     # cancels this cluster's jobs, stops exactly the daemons it started
# Then: export SLURM_CONF=<printed path>; sbatch jobs/digits.sbatch
# Env: MPITRAIN_SLURM_DIR (state/log folder, default .slurm), MPITRAIN_SLURM_CPUS (default 4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=$(realpath -m "${MPITRAIN_SLURM_DIR:-.slurm}")
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
say() { printf '[slurm-local] %s\n' "$*"; }
die() { printf '[slurm-local] error: %s\n' "$*" >&2; exit 1; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

install() {
  local need=()
  for p in slurm-wlm munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

write_conf() {
  local host mem
  host=$(hostname -s)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # total, not free: stable
  mkdir -p "$DIR/ctld" "$DIR/d"
  cat > "$CONF" <<CONF
# written by scripts/slurm-local.sh
ClusterName=mpitrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=${MPITRAIN_SLURM_CPUS:-4} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install
  write_conf
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || $SUDO mungekey --create
    $SUDO mkdir -p /run/munge && $SUDO chown munge:munge /run/munge
    say "starting munged"
    $SUDO runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 2>/dev/null \
      || $SUDO /usr/sbin/munged --force
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true
  fi
  alive "$DIR/slurmctld.pid" || { say "starting slurmctld"; $SUDO slurmctld -f "$CONF"; }
  alive "$DIR/slurmd.pid" || { say "starting slurmd"; $SUDO slurmd -f "$CONF"; }
  local t0=$SECONDS state=""
  while [ $((SECONDS - t0)) -lt 60 ]; do
    state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
    case "$state" in idle|mix|alloc) break ;; esac
    [ "$state" = "down" ] || [ "$state" = "down*" ] && scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
    sleep 0.5
  done
  case "$state" in
    idle|mix|alloc) ;;
    *) echo "--- slurmctld.log"; tail -20 "$DIR/slurmctld.log" 2>/dev/null; echo "--- slurmd.log"
       tail -20 "$DIR/slurmd.log" 2>/dev/null; die "node not idle after 60 s (state '${state:-none}')" ;;
  esac
  say "up: node $(hostname -s) is $state; use: export SLURM_CONF=$CONF"
}

stop() {
  if [ -f "$CONF" ] && alive "$DIR/slurmctld.pid"; then
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    local t0=$SECONDS
    while [ -n "$(squeue -h 2>/dev/null)" ] && [ $((SECONDS - t0)) -lt 20 ]; do sleep 0.5; done
  fi
  for d in slurmd slurmctld munged; do
    if alive "$DIR/$d.pid"; then say "stopping $d"; $SUDO kill "$(cat "$DIR/$d.pid")"; fi
    rm -f "$DIR/$d.pid"
  done
}

status() {
  for d in munged slurmctld slurmd; do
    alive "$DIR/$d.pid" && echo "$d: running (pid $(cat "$DIR/$d.pid"))" || echo "$d: not running"
  done
  [ -f "$CONF" ] && { sinfo 2>/dev/null || true; squeue 2>/dev/null || true; echo "export SLURM_CONF=$CONF"; }
}

case "${1:-}" in
  start) start ;; stop) stop ;; status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
