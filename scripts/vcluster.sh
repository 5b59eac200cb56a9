#!/usr/bin/env bash
# A virtual multi-node Slurm cluster on one machine, for multi-node tests and demos:
# N nodes vn1..vnN, each with its own network namespace (10.77.0.1<i> on a bridge with the
# host at 10.77.0.1), hostname and /tmp, a shaped NIC (tbf) and its own slurmd; slurmctld
# runs in the host's namespace. Root only (network namespaces, bridge, /etc/hosts).
#
#   bash scripts/vcluster.sh up [--nodes N] [--cpus-per-node C] [--rate R] [--latency MS]
#   bash scripts/vcluster.sh status
#   bash scripts/vcluster.sh down
#
#   --nodes N          nodes vn1..vnN (default 2; 1 <= N <= 4 x cores, each node is a slurmd)
#   --cpus-per-node C  CPUs Slurm sees per node (default 2; may exceed the real cores)
#   --rate R           each node's NIC: 1gbit (default), 10gbit, any NUMBER{kbit,mbit,gbit},
#                      or none (unshaped); a tbf qdisc on the node's end of its veth, so it
#                      limits what the node sends. A second `up` with another rate re-shapes
#                      live, without restarting anything.
#   --latency MS       one-way delay added to what each node sends (netem; 0 = none). Needs the
#                      kernel's sch_netem: where it is missing (as on the machine this was
#                      written on) --latency > 0 is rejected with one line, exit 2. tbf's own
#                      "latency" is only its queue bound, not a delay, so it is not used for this.
#
# `up` prints `export SLURM_CONF=<path>`: sinfo/srun/sbatch then talk to this cluster, and
# jobs/*.sbatch run unchanged with --nodes=2 (srun --mpi=pmix or mpirun).
# Open MPI 4.1 (Debian's 4.1.4) on this cluster: point-to-point and collectives need no
# settings (a node's namespace has only `lo` and its NIC, so oob/tcp and btl/tcp can only
# pick the cluster network; vader within a node, tcp between nodes; checked with mpirun from
# the batch script and from `salloc` in the host's namespace, and srun --mpi=pmix; the
# OMPI_MCA_{btl,oob}_tcp_if_include=10.77.0.0/24 settings change nothing). One-sided MPI
# does: an RMA window over ranks on two nodes (MPI.Win.Allocate; mpitrain's heartbeat, the
# parameter-server strategies) fails with MPI_ERR_WIN, since osc/rdma needs an RDMA-capable
# BTL (tcp is not) and osc/pt2pt refuses MPI_THREAD_MULTIPLE (what mpi4py asks for). So every
# task on this cluster gets OMPI_MCA_osc=sm,ucx (TaskProlog, unless the job sets
# OMPI_MCA_osc itself): osc/ucx works here, over UCX's shared memory, because all nodes
# share one kernel. Its RMA traffic therefore bypasses the shaped NICs (collectives do not),
# and on real nodes over Ethernet it would not help: UCX 1.13's osc over tcp alone
# (UCX_TLS=tcp) segfaults in MPI_Win_allocate. Each node needs its own /tmp for Open MPI's
# and PMIx's session folders (their names carry the job id, not the host); /dev/shm is
# shared, but vader's segment names carry the hostname.
# `up` again with the same --nodes/--cpus-per-node is a no-op (or a live re-shape); with other
# ones it rebuilds the cluster, unless jobs are running (then: error, nothing changed).
# `down` stops exactly what `up` started (slurmd per node, slurmctld, munged if it started it,
# every process left in the nodes' namespaces), removes namespaces, veths, bridge, the
# /etc/hosts lines between "# mpitrain-vcluster begin/end", and the state folder.
# Exit: 0 ok; 1 failed (address range or names taken, jobs running, a daemon did not come up);
# 2 bad usage; 3 this machine does not permit it (not root, no ip netns/tc/nsenter/unshare,
# the kernel refuses namespaces): scripts/test.sh skips its vcluster stage on 3.
# Env: MPITRAIN_VCLUSTER_DIR state folder (default .vcluster in the repository; not under
# /tmp, which every node replaces with its own). Ports: slurmctld 6917, slurmd 6918 (not the
# 6817/6818 of scripts/slurm-local.sh, which can run at the same time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=$(realpath -m "${MPITRAIN_VCLUSTER_DIR:-.vcluster}")
CONF=$DIR/slurm.conf
SETTINGS=$DIR/settings
BR=mtbr0                 # bridge in the host's namespace
NET=10.77.0              # /24: host .1, node i .(10+i), i.e. 10.77.0.11, 10.77.0.12, ...
CLUSTER=mpitrain-vc
CTLD_PORT=6917 SLURMD_PORT=6918
HOSTS=/etc/hosts
MARK_BEGIN="# mpitrain-vcluster begin"
MARK_END="# mpitrain-vcluster end"
LOCK=/run/lock/mpitrain-vcluster.lock   # one vcluster per machine: the names are machine-wide
export SLURM_CONF=$CONF

say() { printf '[vcluster] %s\n' "$*"; }
die() { printf '[vcluster] error: %s\n' "$*" >&2; exit 1; }
refuse() { printf '[vcluster] not permitted here: %s\n' "$*" >&2; exit 3; }  # the machine, not the input
usage_error() { printf '[vcluster] usage error: %s (see: %s --help)\n' "$*" "$0" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }

node_addr() { echo "$NET.$((10 + $1))"; }
veth_host() { echo "mtvh$1"; }   # the host's end, on the bridge
veth_node() { echo "mtvn$1"; }   # the node's end, inside vn<i>: its NIC
alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
have_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }
have_link() { ip link show "$1" >/dev/null 2>&1; }

# -- arguments -------------------------------------------------------------------------------
CMD=${1:-}
[ $# -gt 0 ] && shift
NODES=2 CPUS=2 RATE=1gbit LATENCY=0
case "$CMD" in
  -h|--help|help) usage; exit 0 ;;
  up|down|status) ;;
  "") usage_error "missing command: up, down or status" ;;
  *) usage_error "unknown command '$CMD': up, down or status" ;;
esac
while [ $# -gt 0 ]; do
  opt=$1 val=${2-}
  case "$opt" in
    --nodes=*|--cpus-per-node=*|--rate=*|--latency=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
    --nodes|--cpus-per-node|--rate|--latency) [ $# -ge 2 ] || usage_error "$opt needs a value"; shift 2 ;;
    *) usage_error "unknown option '$opt'" ;;
  esac
  [ "$CMD" = up ] || usage_error "$opt applies to 'up' only"
  case "$opt" in
    --nodes) NODES=$val ;; --cpus-per-node) CPUS=$val ;; --rate) RATE=$val ;; --latency) LATENCY=$val ;;
  esac
done
if [ "$CMD" = up ]; then
  cores=$(nproc)
  [[ "$NODES" =~ ^[0-9]+$ ]] || usage_error "--nodes must be a whole number, not '$NODES'"
  [ "$NODES" -ge 1 ] || usage_error "--nodes must be at least 1"
  [ "$NODES" -le $((cores * 4)) ] || usage_error "--nodes $NODES is more than 4 x this machine's $cores cores ($((cores * 4))): every node is a slurmd and its job processes on the same cores"
  [ "$NODES" -le 200 ] || usage_error "--nodes must be at most 200 (addresses $NET.11-$NET.210)"
  [[ "$CPUS" =~ ^[0-9]+$ ]] && [ "$CPUS" -ge 1 ] && [ "$CPUS" -le 1024 ] || usage_error "--cpus-per-node must be a whole number 1..1024, not '$CPUS'"
  [[ "$RATE" =~ ^(none|[0-9]+(\.[0-9]+)?(kbit|mbit|gbit))$ ]] || usage_error "unknown rate '$RATE': use e.g. 1gbit, 10gbit, 500mbit, or none"
  [[ "$LATENCY" =~ ^[0-9]+(\.[0-9]+)?$ ]] || usage_error "--latency must be milliseconds (a number >= 0), not '$LATENCY'"
fi

# -- preflight ---------------------------------------------------------------------------------
install() {
  local need=()
  for p in iproute2 slurm-wlm munge; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || refuse "missing packages ${need[*]} and no apt-get to install them"
    say "installing ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null; } || refuse "could not install ${need[*]} with apt-get"
  fi
}

preflight() {  # one line and exit 1 if this machine cannot host the cluster; creates nothing lasting
  [ "$(id -u)" -eq 0 ] || refuse "needs root (network namespaces, a bridge, /etc/hosts); run as root or with sudo"
  install
  local c
  for c in ip tc nsenter unshare flock slurmctld slurmd sinfo munge unmunge; do
    command -v "$c" >/dev/null || refuse "'$c' is missing (needs iproute2, util-linux, slurm-wlm, munge)"
  done
  [[ "$(ip netns help 2>&1 || true)" == *"ip netns add"* ]] || refuse "this 'ip' has no 'ip netns'"
  local probe="mtvc-probe-$$" err
  if ! err=$(ip netns add "$probe" 2>&1); then
    refuse "the kernel refuses a network namespace (ip netns add: ${err//$'\n'/ })"
  fi
  ip netns del "$probe" 2>/dev/null || true
  unshare --uts --mount --propagation private true 2>/dev/null \
    || refuse "the kernel refuses UTS/mount namespaces (unshare --uts --mount)"
}

# -- recorded settings ---------------------------------------------------------------------------
load_settings() {  # sets S_NODES S_CPUS S_RATE S_LATENCY S_MUNGED from $SETTINGS; false if none
  [ -f "$SETTINGS" ] || return 1
  S_NODES="" S_CPUS="" S_RATE="" S_LATENCY=0
  # shellcheck disable=SC1090
  . "$SETTINGS"
}

save_settings() {
  mkdir -p "$DIR"
  printf 'S_NODES=%s\nS_CPUS=%s\nS_RATE=%s\nS_LATENCY=%s\n' "$NODES" "$CPUS" "$RATE" "$LATENCY" > "$SETTINGS"
}

# -- network ---------------------------------------------------------------------------------------
net_free() {  # the address range and the names must be free (unless this cluster holds them)
  if ip -4 addr | grep -q " $NET\." || ip -4 route | grep -q "^$NET\."; then
    die "$NET.0/24 is already in use by another interface or route ($(ip -4 -o addr | awk -v n=" $NET." 'index($0, n) {print $2; exit}')); nothing created"
  fi
  have_link "$BR" && die "a link named $BR already exists (another vcluster? its 'down' removes it); nothing created"
  local i
  for ((i = 1; i <= NODES; i++)); do
    have_netns "vn$i" && die "a network namespace vn$i already exists (another vcluster?); nothing created"
    have_link "$(veth_host "$i")" && die "a link named $(veth_host "$i") already exists; nothing created"
  done
  grep -qxF "$MARK_BEGIN" "$HOSTS" && die "$HOSTS already has a '$MARK_BEGIN' block (another vcluster?); nothing created"
  if command -v ss >/dev/null && [ -n "$(ss -Hltn "sport = :$CTLD_PORT" 2>/dev/null)" ]; then
    die "port $CTLD_PORT (slurmctld) is already in use on this machine; nothing created"
  fi
  return 0
}

net_up() {
  ip link add "$BR" type bridge
  ip addr add "$NET.1/24" dev "$BR"
  ip link set "$BR" up
  local i h n
  for ((i = 1; i <= NODES; i++)); do
    h=$(veth_host "$i") n=$(veth_node "$i")
    ip netns add "vn$i"
    ip link add "$h" type veth peer name "$n"
    ip link set "$n" netns "vn$i"
    ip link set "$h" master "$BR"
    ip link set "$h" up
    ip -n "vn$i" link set lo up
    ip -n "vn$i" addr add "$(node_addr "$i")/24" dev "$n"
    ip -n "vn$i" link set "$n" up
  done
}

burst_of() {  # tbf bucket: 256 KiB, or 2 ms at the rate if more (a 10gbit bucket must be bigger)
  awk -v r="$1" 'BEGIN { n = r + 0; u = substr(r, length(n "") + 1)
    m = (u == "kbit") ? 1e3 : (u == "mbit") ? 1e6 : 1e9; b = n * m / 8 * 0.002
    printf "%d", (b > 262144 ? b : 262144) }'
}

netem_ok() {  # is sch_netem in this kernel? (tried in a throwaway namespace)
  local probe="mtvc-netem-$$" ok=1
  ip netns add "$probe" 2>/dev/null || return 1
  tc -n "$probe" qdisc add dev lo root netem delay 1ms 2>/dev/null && ok=0
  ip netns del "$probe" 2>/dev/null || true
  return $ok
}

shape() {  # the qdisc of every node's NIC for $RATE / $LATENCY (replace: works live)
  local i n dev_args
  for ((i = 1; i <= NODES; i++)); do
    n=$(veth_node "$i")
    if [ "$LATENCY" != 0 ]; then
      dev_args=(netem delay "${LATENCY}ms" limit 100000)
      [ "$RATE" = none ] || dev_args+=(rate "$RATE")
      tc -n "vn$i" qdisc replace dev "$n" root "${dev_args[@]}"
    elif [ "$RATE" = none ]; then
      tc -n "vn$i" qdisc del dev "$n" root 2>/dev/null || true
    else
      tc -n "vn$i" qdisc replace dev "$n" root tbf rate "$RATE" burst "$(burst_of "$RATE")" latency 50ms
    fi
  done
}

hosts_add() {
  local i block
  block="$MARK_BEGIN"$'\n'
  for ((i = 1; i <= NODES; i++)); do block+="$(node_addr "$i") vn$i"$'\n'; done
  block+="$MARK_END"
  [ -z "$(tail -c1 "$HOSTS")" ] || echo >> "$HOSTS"
  printf '%s\n' "$block" >> "$HOSTS"   # append in place: /etc/hosts may be a bind mount
}

hosts_remove() {
  grep -qxF "$MARK_BEGIN" "$HOSTS" 2>/dev/null || return 0
  local kept
  kept=$(awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0 == b {skip = 1; next} $0 == e && skip {skip = 0; next} !skip' "$HOSTS")
  printf '%s\n' "$kept" > "$HOSTS"     # rewrite in place (same inode), not a rename
}

# -- daemons -----------------------------------------------------------------------------------------
munge_up() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0   # reuse a working munged
  [ -f /etc/munge/munge.key ] || mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge
  say "starting munged"
  # (9>&-: the daemons must not inherit the lock's descriptor, or they would hold it forever)
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 2>/dev/null 9>&- || /usr/sbin/munged --force 9>&-
  cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true  # ours: `down` stops it
  local t0=$SECONDS
  until munge -n 2>/dev/null | unmunge >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt 10 ] || die "munged does not answer (munge -n | unmunge)"
    sleep 0.2
  done
}

write_conf() {
  local host mem i
  host=$(hostname -s)
  mem=$(awk -v n="$NODES" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
  mkdir -p "$DIR/ctld" "$DIR/d"
  for ((i = 1; i <= NODES; i++)); do mkdir -p "$DIR/d/vn$i" "$DIR/tmp-vn$i"; chmod 1777 "$DIR/tmp-vn$i"; done
  # every task's environment (the batch script's too; mpirun passes OMPI_MCA_* on): see the
  # top of this file for why one-sided MPI needs osc/ucx on this cluster
  cat > "$DIR/task-prolog.sh" <<'PROLOG'
#!/bin/sh
# written by scripts/vcluster.sh: prints `export` lines for every task of the virtual cluster
[ -n "${OMPI_MCA_osc:-}" ] || echo "export OMPI_MCA_osc=sm,ucx"
PROLOG
  chmod 755 "$DIR/task-prolog.sh"
  {
    echo "# written by scripts/vcluster.sh ($NODES nodes x $CPUS CPUs)"
    cat <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$host($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/d/%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/d/%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$DIR/task-prolog.sh
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
CONF
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=vn$i NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=vc Nodes=vn[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } > "$CONF"
}

slurmd_up() {  # slurmd of node i: its network namespace, its own hostname and /tmp
  local i=$1 keep="" top
  # a repository checked out under /tmp (e.g. a CI clone) must stay visible in the node: its
  # parent folder (the repository and ../shared) is bound into the node's new /tmp first
  top=$(dirname "$PWD")
  case "$top/" in
    /tmp/*) keep="mkdir -p '$DIR/tmp-vn$i${top#/tmp}' && mount --bind '$top' '$DIR/tmp-vn$i${top#/tmp}' && " ;;
  esac
  nsenter --net="/var/run/netns/vn$i" unshare --uts --mount --propagation private \
    sh -c "$keep mount --rbind '$DIR/tmp-vn$i' /tmp && hostname vn$i && exec slurmd -f '$CONF' -N vn$i"
}

show_logs() {
  local i
  echo "--- slurmctld.log (tail)" >&2; tail -20 "$DIR/slurmctld.log" >&2 2>/dev/null || true
  for ((i = 1; i <= NODES; i++)); do
    echo "--- vn$i slurmd log (tail)" >&2; tail -10 "$DIR/d/vn$i.log" >&2 2>/dev/null || true
  done
}

daemons_up() {
  if ! alive "$DIR/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld -f "$CONF" 9>&- || { show_logs; die "slurmctld did not start (exit $?)"; }
  fi
  local i started=()
  for ((i = 1; i <= NODES; i++)); do
    alive "$DIR/d/vn$i.pid" && continue
    slurmd_up "$i" 9>&- || { show_logs; die "slurmd on vn$i did not start"; }
    started+=("vn$i")
  done
  [ ${#started[@]} -eq 0 ] || say "started slurmd on ${started[*]}"
}

wait_idle() {  # every node idle (or busy with jobs) within 60 s
  local t0=$SECONDS ready=0 states=""
  while [ $((SECONDS - t0)) -lt 60 ]; do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
    ready=$(awk '$2 ~ /^(idle|mix|alloc|comp)$/' <<< "$states" | wc -l)
    [ "$ready" -eq "$NODES" ] && return 0
    local down
    down=$(awk '$2 ~ /^down/ {print $1}' <<< "$states" | paste -sd, -)
    [ -z "$down" ] || scontrol update nodename="$down" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  show_logs
  printf '[vcluster] error: %s\n' "only $ready of $NODES nodes idle after 60 s: ${states//$'\n'/, }" >&2
  return 1
}

# -- teardown ------------------------------------------------------------------------------------------
stop_pid() {  # stop_pid PIDFILE NAME: TERM, wait up to 10 s, then KILL
  local f=$1 pid t0
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  say "stopping $2 (pid $pid)"
  kill "$pid" 2>/dev/null || true
  t0=$SECONDS
  while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt 10 ]; do sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

kill_netns_procs() {  # whatever still runs in vn<i> (job steps whose slurmd is gone)
  local ns=$1 sig pids
  for sig in TERM KILL; do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [ -n "${pids// /}" ] || return 0
    # shellcheck disable=SC2086
    kill -"$sig" $pids 2>/dev/null || true
    local t0=$SECONDS
    while [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && [ $((SECONDS - t0)) -lt 5 ]; do sleep 0.2; done
  done
}

teardown() {  # everything this state folder records, in reverse; quiet about what is not there
  load_settings || return 0
  local n=${S_NODES:-0} i
  if [ -f "$CONF" ] && alive "$DIR/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | paste -sd' ' - || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel --quiet $jobs 2>/dev/null || true
      local t0=$SECONDS
      while [ -n "$(squeue -h 2>/dev/null)" ] && [ $((SECONDS - t0)) -lt 15 ]; do sleep 0.5; done
    fi
  fi
  for ((i = 1; i <= n; i++)); do stop_pid "$DIR/d/vn$i.pid" "slurmd vn$i"; done
  for ((i = 1; i <= n; i++)); do have_netns "vn$i" && kill_netns_procs "vn$i"; done
  # shared-memory segments that killed ranks of the nodes leave behind (named after vn<i>)
  for ((i = 1; i <= n; i++)); do rm -f /dev/shm/vader_segment."vn$i".*; done
  stop_pid "$DIR/slurmctld.pid" slurmctld
  stop_pid "$DIR/munged.pid" "munged (started by vcluster)"
  for ((i = 1; i <= n; i++)); do
    have_link "$(veth_host "$i")" && ip link del "$(veth_host "$i")" 2>/dev/null || true
    have_netns "vn$i" && ip netns del "vn$i" 2>/dev/null || true
  done
  have_link "$BR" && ip link del "$BR" 2>/dev/null || true
  hosts_remove
  # the per-node /tmp bind mounts live in the nodes' own mount namespaces, gone with their
  # last process; the state folder (logs included) goes last
  [ -f "$SETTINGS" ] && rm -rf "$DIR"
  return 0
}

# -- commands ------------------------------------------------------------------------------------------
summary() {
  local rate=$RATE
  [ "$rate" = none ] && rate="unshaped"
  [ "$LATENCY" = 0 ] || rate+=", +${LATENCY} ms one-way"
  say "up: $NODES node(s) vn1..vn$NODES x $CPUS CPUs, NIC $rate, partition vc, slurmctld $NET.1:$CTLD_PORT, tasks get OMPI_MCA_osc=sm,ucx"
  echo "export SLURM_CONF=$CONF"
}

jobs_running() { [ -n "$(squeue -h 2>/dev/null || true)" ]; }

cmd_up() {
  preflight
  if [ "$LATENCY" != 0 ] && ! netem_ok; then
    usage_error "--latency needs the netem qdisc (sch_netem), which this kernel does not have; use --latency 0"
  fi
  mkdir -p "$(dirname "$LOCK")"; exec 9>"$LOCK"
  flock -w 60 9 || die "another vcluster.sh up/down holds $LOCK"
  if load_settings; then
    if [ "$S_NODES" = "$NODES" ] && [ "$S_CPUS" = "$CPUS" ] && have_link "$BR"; then
      if [ "$S_RATE" != "$RATE" ] || [ "$S_LATENCY" != "$LATENCY" ]; then
        shape
        save_settings
        say "re-shaped the nodes' NICs: $S_RATE -> $RATE (latency ${S_LATENCY} -> ${LATENCY} ms)"
      fi
      daemons_up
      wait_idle || die "the cluster is up but not healthy (see the logs above); try: $0 down"
      summary
      return 0
    fi
    if alive "$DIR/slurmctld.pid" && jobs_running; then
      die "already up with ${S_NODES} nodes x ${S_CPUS} CPUs and jobs are running: not changing to $NODES x $CPUS (scancel them or '$0 down' first)"
    fi
    say "rebuilding: was ${S_NODES} nodes x ${S_CPUS} CPUs, now $NODES x $CPUS"
    teardown
  fi
  net_free
  save_settings                                  # from here on, `teardown` undoes what exists
  trap 'rc=$?; if [ $rc -ne 0 ]; then say "up failed: undoing"; teardown; fi' EXIT
  net_up
  shape
  hosts_add
  munge_up
  write_conf
  daemons_up
  wait_idle || exit 1
  trap - EXIT
  summary
}

cmd_down() {
  [ "$(id -u)" -eq 0 ] || refuse "needs root"
  if ! load_settings; then say "nothing is up (no $SETTINGS)"; return 0; fi
  mkdir -p "$(dirname "$LOCK")"; exec 9>"$LOCK"
  flock -w 60 9 || die "another vcluster.sh up/down holds $LOCK"
  teardown
  say "down"
}

cmd_status() {
  if ! load_settings; then say "down (no $SETTINGS)"; return 0; fi
  local rate=$S_RATE i d
  [ "$rate" = none ] && rate="unshaped"
  say "state $DIR: ${S_NODES} nodes x ${S_CPUS} CPUs, NIC $rate, latency ${S_LATENCY} ms"
  [ -f "$DIR/munged.pid" ] && { alive "$DIR/munged.pid" && echo "munged: running (pid $(cat "$DIR/munged.pid"), started by vcluster)" || echo "munged: not running"; } \
    || echo "munged: $(munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && echo "shared (not started by vcluster)" || echo "not answering")"
  alive "$DIR/slurmctld.pid" && echo "slurmctld: running (pid $(cat "$DIR/slurmctld.pid"))" || echo "slurmctld: not running"
  for ((i = 1; i <= S_NODES; i++)); do
    d="vn$i $(node_addr "$i"):"
    have_netns "vn$i" || { echo "$d namespace missing"; continue; }
    alive "$DIR/d/vn$i.pid" && d+=" slurmd running (pid $(cat "$DIR/d/vn$i.pid"))" || d+=" slurmd not running"
    d+=", qdisc: $(tc -n "vn$i" qdisc show dev "$(veth_node "$i")" root 2>/dev/null | head -1 | awk '{$3 = ""; print}' | tr -s ' ')"
    echo "$d"
  done
  if alive "$DIR/slurmctld.pid"; then sinfo 2>/dev/null || true; squeue 2>/dev/null || true; fi
  echo "export SLURM_CONF=$CONF"
}

case "$CMD" in
  up) cmd_up ;; down) cmd_down ;; status) cmd_status ;;
esac
