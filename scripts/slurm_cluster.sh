#!/usr/bin/env bash
# A real Slurm cluster of N emulated nodes on this one machine: munged, slurmctld and one
# `slurmd -N nK` per node, all from Debian's slurm-wlm and munge packages (installed with
# apt-get when missing). The tests start it (tests/conftest.py, fixture slurm_cluster), and so
# does .ci/run; people can use it to try `sfd-launch slurm` before a real cluster.
#
# usage: scripts/slurm_cluster.sh start|stop|status
#   start   install what is missing, write the slurm.conf, start the daemons that are not
#           running, wait until `sinfo` shows every node idle (exit 1 with the logs if not)
#   stop    cancel the cluster's jobs, then stop exactly the daemons `start` started
#   status  the daemons and `sinfo`; exit 0 when every node answers, 3 otherwise
#
# Settings (environment):
#   SFD_SLURM_NODES  nodes n1..nN (default 2)
#   SFD_SLURM_DIR    state, spool, logs and pid files (default /var/lib/sfd-slurm)
#   SFD_SLURM_PORT   slurmctld's port; the slurmd's listen on 17001.. (default 6817)
#   SLURM_CONF       where the slurm.conf goes (default /etc/slurm/slurm.conf, Slurm's own
#                    default, so sbatch/squeue/scontrol find it without settings). A file
#                    there that this script did not write is never replaced.
#
# Every node is this host (NodeHostname) at 127.0.0.1 (NodeAddr) with its own port: node
# names such as n1 do not resolve, which is what the launcher must cope with on real
# clusters too. Jobs run as root, processes are tracked by parentage (no cgroups here).
set -euo pipefail

readonly NODES="${SFD_SLURM_NODES:-2}"
readonly DIR="${SFD_SLURM_DIR:-/var/lib/sfd-slurm}"
readonly CTLD_PORT="${SFD_SLURM_PORT:-6817}"
readonly CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
readonly MARK="# Written by sfd-train scripts/slurm_cluster.sh"
readonly STARTED="$DIR/started"   # "name pid" of every daemon this script started
readonly FIRST_SLURMD_PORT=17001
export SLURM_CONF="$CONF"

log() { printf '[slurm_cluster] %s\n' "$*"; }
die() { printf '[slurm_cluster] error: %s\n' "$*" >&2; exit 1; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do printf 'n%d\n' "$i"; done; }

# Whether pid $1 is alive and runs the program named $2 (pids are reused).
runs() {
  local comm
  [ -n "$1" ] && comm=$(cat "/proc/$1/comm" 2>/dev/null) && [ "$comm" = "$2" ]
}

pid_in() { cat "$1" 2>/dev/null || true; }

install_packages() {
  local missing=()
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  for tool in slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null 2>&1 || { missing+=(slurm-wlm); break; }
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || die "${missing[*]} not installed, and installing needs root (apt-get install slurm-wlm munge)"
  log "installing ${missing[*]} from the Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be missing on a fresh machine; update only when the install fails.
  apt-get install -y -q --no-install-recommends slurm-wlm munge >"$DIR/log/apt.log" 2>&1 ||
    { apt-get update -q >>"$DIR/log/apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$DIR/log/apt.log" 2>&1; } ||
    { tail -n 20 "$DIR/log/apt.log" >&2; die "apt-get install slurm-wlm munge failed (log: $DIR/log/apt.log)"; }
}

write_conf() {
  local host cpus memory last_port
  host=$(hostname)
  cpus=$(nproc)
  # MiB, a little under what the machine has: slurmd drains a node that claims more.
  memory=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  last_port=$((FIRST_SLURMD_PORT + NODES - 1))
  if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script; set SLURM_CONF to another path to use both"
  fi
  mkdir -p "$(dirname "$CONF")"
  cat >"$CONF.tmp" <<EOF
$MARK: $NODES emulated node(s) on $host.
ClusterName=sfdlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups on this machine: track a job's processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Requeue jobs that lose a node. A node that stopped answering is usable again once its
# slurmd registers; one set DOWN by hand stays down until scontrol update nodename=nK
# state=resume (the node-loss tests need that: a lost node does not come back by itself).
JobRequeue=1
ReturnToService=1
# Seconds between SIGTERM and SIGKILL when a job ends early (scancel, time limit, lost node).
KillWait=30
# Keep finished jobs visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=$FIRST_SLURMD_PORT-$last_port CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv -f "$CONF.tmp" "$CONF"
}

record() { printf '%s %s\n' "$1" "$2" >>"$STARTED"; }

start_munged() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # someone's munged answers: use it, leave it running
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
  local pid
  pid=$(pid_in /run/munge/munged.pid)
  runs "$pid" munged || die "munged did not start (log: /var/log/munge/munged.log)"
  record munged "$pid"
  log "munged started (pid $pid)"
}

start_slurmctld() {
  local pid
  pid=$(pid_in "$DIR/run/slurmctld.pid")
  if runs "$pid" slurmctld; then
    return
  fi
  # -c: a fresh start forgets the jobs and node states of an earlier cluster.
  slurmctld -c
  for _ in $(seq 50); do
    pid=$(pid_in "$DIR/run/slurmctld.pid")
    runs "$pid" slurmctld && break
    sleep 0.1
  done
  runs "$pid" slurmctld || { tail -n 20 "$DIR/log/slurmctld.log" >&2 || true; die "slurmctld did not start"; }
  record slurmctld "$pid"
  log "slurmctld started (pid $pid)"
}

start_slurmds() {
  local node pid
  for node in $(node_names); do
    pid=$(pid_in "$DIR/run/slurmd-$node.pid")
    runs "$pid" slurmd && continue
    mkdir -p "$DIR/spool/$node"
    slurmd -N "$node"
    for _ in $(seq 50); do
      pid=$(pid_in "$DIR/run/slurmd-$node.pid")
      runs "$pid" slurmd && break
      sleep 0.1
    done
    runs "$pid" slurmd || { tail -n 20 "$DIR/log/slurmd-$node.log" >&2 || true; die "slurmd -N $node did not start"; }
    record "slurmd-$node" "$pid"
    log "slurmd -N $node started (pid $pid)"
  done
}

# Node states as sinfo prints them, one "name state" per line.
node_states() { sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

wait_idle() {
  local deadline=$((SECONDS + 60)) states busy
  while :; do
    states=$(node_states)
    busy=$(printf '%s\n' "$states" | awk '$2 !~ /^(idle|alloc|mix)$/' | grep -c . || true)
    if [ -n "$states" ] && [ "$(printf '%s\n' "$states" | grep -c .)" -eq "$NODES" ] && [ "$busy" -eq 0 ]; then
      log "$NODES node(s) up: $(printf '%s\n' "$states" | tr '\n' ' ')"
      return
    fi
    if [ $SECONDS -ge $deadline ]; then
      printf '%s\n' "$states" >&2
      tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
      die "the nodes did not become idle within 60 s (logs in $DIR/log)"
    fi
    sleep 0.5
  done
}

start() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  install_packages
  local running=0 node
  runs "$(pid_in "$DIR/run/slurmctld.pid")" slurmctld && running=1
  if [ $running -eq 1 ]; then
    # A running cluster keeps its config: a different node count needs stop first.
    if ! grep -q "^NodeName=n\[1-$NODES\] " "$CONF" 2>/dev/null; then
      die "a cluster is running with another node count ($(grep -o '^NodeName=[^ ]*' "$CONF" || echo '?')); stop it first"
    fi
  else
    write_conf
  fi
  start_munged
  start_slurmctld
  start_slurmds
  for node in $(node_names); do
    # A node left DOWN/DRAIN by an earlier run (a test that set it down) is usable again.
    if node_states | grep -qE "^$node (down|drain|drng|fail)"; then
      scontrol update nodename="$node" state=resume 2>/dev/null || true
    fi
  done
  wait_idle
  log "ready: SLURM_CONF=$CONF; try: sinfo, sbatch, scripts/slurm_cluster.sh stop"
}

stop() {
  [ -f "$STARTED" ] || { log "nothing to stop (no daemons started by this script)"; return 0; }
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling job(s) $(echo "$jobs" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one word per job id
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 90); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  # The reverse order of starting: the slurmd's, then slurmctld, then munged.
  local name pid
  tac "$STARTED" | while read -r name pid; do
    if runs "$pid" "${name%%-*}"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do runs "$pid" "${name%%-*}" || break; sleep 0.1; done
      runs "$pid" "${name%%-*}" && kill -KILL "$pid" 2>/dev/null
      log "stopped $name (pid $pid)"
    fi
  done
  rm -f "$STARTED"
}

status() {
  local ok=0 name pid node
  for name in slurmctld $(node_names | sed 's/^/slurmd-/'); do
    if [ "$name" = slurmctld ]; then
      pid=$(pid_in "$DIR/run/slurmctld.pid")
    else
      pid=$(pid_in "$DIR/run/$name.pid")
    fi
    if runs "$pid" "${name%%-*}"; then
      log "$name running (pid $pid)"
    else
      log "$name not running"
      ok=3
    fi
  done
  [ $ok -eq 0 ] || return $ok
  sinfo -N -o '%N %t %o %c' || return 3
  for node in $(node_names); do
    node_states | grep -qE "^$node (idle|alloc|mix)" || ok=3
  done
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (see the comments at the top of this file)" >&2; exit 2 ;;
esac
