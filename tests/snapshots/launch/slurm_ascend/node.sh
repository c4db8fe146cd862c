#!/usr/bin/env bash
# Per-node launcher of an sfd-train run, written by `sfd-launch slurm`
# (re-running sfd-launch rewrites it).
#
# Starts one torchrun agent for the 8 worker(s) of this node and turns the
# preemption signals SIGUSR2 and SIGTERM into "checkpoint, then stop for a requeue".
# The same file serves every node; what differs between nodes comes from the
# environment (c10d rendezvous):
#   SFD_NNODES       nodes in the job (default 2)
#   SFD_NODE_RANK    rank of this node, for static rendezvous (default $SLURM_NODEID, else 0)
#   SFD_MASTER_ADDR  host of node 0, where the rendezvous runs (default 127.0.0.1)
#   SFD_MASTER_PORT  rendezvous port (default 29500)
#   SFD_RDZV_ID      id of a c10d rendezvous (default $SLURM_JOB_ID)
#   SFD_PREEMPTED    USR2 when the batch script had Slurm's warning before this started
# Exit status: torchrun's, but 0 when the trainer stopped for a requeue (its REQUEUE
# file exists, so the checkpoint is complete), and 78 when this node's
# set-up is unusable (a retry would fail the same way).

# Not `set -e`: the exit status of `wait` is information here, not an error.
set -uo pipefail

readonly WORKDIR=/work/sfd
readonly OUTPUT_DIR=/scratch/sfd/runs/slurm_ascend
readonly REQUEUE_FILE="$OUTPUT_DIR/REQUEUE"
readonly SETUP_ERROR_FILE=/scratch/sfd/runs/slurm_ascend/launch/SETUP_ERROR
readonly CONFIG_FILE=/scratch/sfd/runs/slurm_ascend/launch/config.yaml
readonly LAYOUT_FILE=/scratch/sfd/runs/slurm_ascend/launch/layout
readonly SETUP_ERROR=78
readonly PYTHON=python
readonly TORCHRUN=torchrun
NNODES="${SFD_NNODES:-2}"
NODE_RANK="${SFD_NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${SFD_MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${SFD_MASTER_PORT:-29500}"
RDZV_ID="${SFD_RDZV_ID:-${SLURM_JOB_ID:-sfd}}"

# Under Slurm the node's name (emulated nodes share one host name).
readonly NODE_NAME="${SLURMD_NODENAME:-$HOSTNAME}"
log() { printf '[sfd-launch %s %s node %s] %s\n' "$(date '+%F %T')" "$NODE_NAME" "$NODE_RANK" "$*"; }

# ---- preemption: SIGUSR2 (Slurm's warning) and SIGTERM may come at any time ----
# Set up first: the warning may arrive while this node is still being set up, and
# SIGUSR2's default action would end this script. Before torchrun runs, SIGUSR2 is
# kept for later and SIGTERM ends the node at once (there is nothing to save yet).
TORCHRUN_PID=""
# The batch script had the warning before it started this step.
PREEMPTED="${SFD_PREEMPTED:-}"

# Direct children of process $1, read from /proc (no procps needed in containers).
# shellcheck disable=SC2329  # called from forward_preemption
child_pids() {
  local stat line ppid
  for stat in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$stat" || continue
    # The command name may hold spaces and ')': the fields we need follow its last ')'.
    read -r _ ppid _ <<<"${line##*) }"
    if [ "$ppid" = "$1" ]; then
      stat=${stat%/stat}
      printf '%s\n' "${stat#/proc/}"
    fi
  done
}

# Whether process $1 has a handler for SIGUSR2 (bit 12 of SigCgt in /proc/PID/status):
# a worker that has not installed the trainer's handler yet ignores the signal.
# shellcheck disable=SC2329  # called from deliver_preemption
catches_usr2() {
  local text mask
  # Read in one go: /proc files may not support the seeks of line-by-line reads.
  { text=$(<"/proc/$1/status"); } 2>/dev/null || return 1
  mask=${text#*SigCgt:}
  mask=${mask%%$'\n'*}
  mask=${mask//[[:space:]]/}
  [ -n "$mask" ] && [ $((0x$mask & (1 << 11))) -ne 0 ]
}

# SIGUSR2 and SIGTERM both mean "checkpoint at the next step, then stop". The request
# goes straight to the workers, torchrun's direct children: the agent does not pass
# USR2 on, and on TERM it tears the workers down (SIGTERM, SIGKILL 30 s later)
# instead of letting them save. Only direct children, not their process groups: the
# workers' own children (data-loader processes) must not get it. Slurm may send its
# warning while the workers are still starting, before the trainer catches SIGUSR2, so
# a background loop hands it to each worker once that worker catches it, until
# torchrun ends.
# shellcheck disable=SC2329  # started by forward_preemption
deliver_preemption() {
  trap '' USR2 TERM INT
  local pid delivered=" " count=0
  while kill -0 "$TORCHRUN_PID" 2>/dev/null; do
    for pid in $(child_pids "$TORCHRUN_PID"); do
      case "$delivered" in *" $pid "*) continue ;; esac
      if catches_usr2 "$pid"; then
        delivered="$delivered$pid "
        count=$((count + 1))
        # Logged first: the worker may stop (and the step end) right after the signal.
        log "asking worker $pid to checkpoint and stop ($count of 8)"
        kill -s USR2 "$pid" 2>/dev/null
      fi
    done
    [ "$count" -ge 8 ] && return 0
    sleep 0.5
  done
}

# shellcheck disable=SC2329  # called from the traps below
forward_preemption() {
  if [ -z "$TORCHRUN_PID" ] && [ "$1" = TERM ]; then
    log "received SIGTERM before training started: stopping"
    exit 143
  fi
  log "received SIG$1: the workers will checkpoint and stop"
  if [ -z "$PREEMPTED" ] && [ -n "$TORCHRUN_PID" ]; then
    deliver_preemption &
  fi
  PREEMPTED=$1
}
trap 'forward_preemption USR2' USR2
trap 'forward_preemption TERM' TERM

# A broken node set-up: say why, leave a note for the batch script (srun's exit
# status no longer tells once --kill-on-bad-exit has stopped the other nodes), stop.
# After a stop signal the failure may be the signal's doing (it reaches the set-up
# commands too): then it is an ordinary failure, not a set-up error.
die() {
  if [ -n "$PREEMPTED" ]; then
    log "error: $* (after SIG$PREEMPTED, which may have caused it)" >&2
    exit 1
  fi
  log "error: $*" >&2
  printf '%s node %s: %s\n' "$NODE_NAME" "$NODE_RANK" "$*" >>"$SETUP_ERROR_FILE" 2>/dev/null
  exit "$SETUP_ERROR"
}

cd "$WORKDIR" || die "cannot enter the working directory $WORKDIR"

# ---- Ascend CANN environment ----
CANN_CANDIDATES=(/usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh)
CANN_SET_ENV=""
for candidate in "${CANN_CANDIDATES[@]}"; do
  if [ -f "$candidate" ]; then
    CANN_SET_ENV=$candidate
    break
  fi
done
if [ -z "$CANN_SET_ENV" ]; then
  die 'no CANN environment on this node: tried /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh (install the CANN toolkit, or point launcher.ascend.cann_set_env at its set_env.sh)'
fi
# set_env.sh reads variables that may be unset.
set +u
# shellcheck source=/dev/null
source "$CANN_SET_ENV" || die "sourcing $CANN_SET_ENV failed"
set -u
log "CANN environment: $CANN_SET_ENV"

# ---- launcher.env_setup ----
# The lines may source files and read unset variables (conda, modules).
# shellcheck disable=SC1090,SC1091
env_setup() {
  source /opt/conda/bin/activate sfd
}
set +u
env_setup || die "launcher.env_setup failed (status $?)"
set -u

# ---- HCCL and NPU runtime (launcher.ascend) ----
export HCCL_CONNECT_TIMEOUT=1200
export HCCL_EXEC_TIMEOUT=1800
export HCCL_WHITELIST_DISABLE=1
# HCCL_IF_IP: the address the other nodes reach this one on, i.e. the source
# address of the route towards the master node (HCCL wants an address, not a
# name). A value the cluster already set is kept.
route_source_ip() {
  local target addr
  target=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
  addr=$(ip -4 route get "${target:-$1}" 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "src") {print $(i + 1); exit}}')
  if [ -z "$addr" ]; then
    addr=$(hostname -I 2>/dev/null | awk '{print $1}')
  fi
  printf '%s\n' "$addr"
}
if [ -z "${HCCL_IF_IP:-}" ]; then
  HCCL_IF_IP=$(route_source_ip "$MASTER_ADDR")
fi
if [ -n "$HCCL_IF_IP" ]; then
  export HCCL_IF_IP
else
  unset HCCL_IF_IP
  log "warning: no address found for HCCL_IF_IP; HCCL chooses an interface itself"
fi
export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}"
export TASK_QUEUE_ENABLE=2
export CPU_AFFINITY_CONF=1
export COMBINED_ENABLE=1
export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True

# ---- MindSpeed (launcher.ascend.mindspeed) ----
if ! mindspeed_error=$("$PYTHON" -c 'import mindspeed' 2>&1); then
  die "launcher.ascend.mindspeed is true but $PYTHON cannot import mindspeed: $(printf '%s\n' "$mindspeed_error" | tail -n 1) (install MindSpeed on the nodes, or set launcher.ascend.mindspeed=false)"
fi
# The trainer imports mindspeed.megatron_adaptor (before building the model) when this is 1.
export SFD_ENABLE_MINDSPEED=1

# ---- what runs where: one block per node in the log ----
readonly VERSIONS_PY='import importlib.metadata as md, platform, sys
prefixes = ("torch", "deepspeed", "sfd", "mindspeed", "triton", "apex", "numpy", "nvidia-nccl")
found = sorted((d.metadata["Name"] or "?", d.version) for d in md.distributions()
               if (d.metadata["Name"] or "").lower().startswith(prefixes))
print("python", platform.python_version(), sys.executable)
print(" ".join(f"{n}=={v}" for n, v in found))'
command -v "$TORCHRUN" >/dev/null 2>&1 ||
  die "torchrun not found ($TORCHRUN): activate its environment in launcher.env_setup or set launcher.torchrun"
log "node $NODE_RANK of $NNODES, rendezvous $MASTER_ADDR:$MASTER_PORT, torchrun: $(command -v "$TORCHRUN")"
"$PYTHON" -c "$VERSIONS_PY" 2>&1 | sed 's/^/  /' || log "warning: cannot list package versions with $PYTHON"
env | grep -E '^(CUDA_VISIBLE_DEVICES|NCCL_|GLOO_|HCCL_|ASCEND_|RANK_TABLE_FILE|TASK_QUEUE_ENABLE|CPU_AFFINITY_CONF|PYTORCH_|COMBINED_ENABLE|OMP_NUM_THREADS|SFD_)' | sort | sed 's/^/  /' || true
if command -v npu-smi >/dev/null 2>&1; then
  npu-smi info 2>&1 | sed 's/^/  /'
fi

# ---- the layout on the nodes this job was given ----
# A Slurm job with launcher.slurm.min_nodes may get any node count in its range, and
# another one after a requeue: the mesh, the per-rank micro-batch and the accumulation
# follow it (the global batch stays). Node 0 records it, to say when it changed.
LAYOUT_ARGS="" LAYOUT="" LAYOUT_WAS="" LAYOUT_ERROR=""
record_layout=()
[ "$NODE_RANK" = 0 ] && record_layout=(--record "$LAYOUT_FILE")
layout_vars=$("$PYTHON" -m sfd_train.launchers.layout "$CONFIG_FILE" --nodes "$NNODES" \
  --nproc-per-node 8 "${record_layout[@]}") ||
  die "cannot work out the layout with $PYTHON -m sfd_train.launchers.layout (is sfd-train installed there?)"
eval "$layout_vars"
[ -z "$LAYOUT_ERROR" ] || die "$LAYOUT_ERROR"
read -r -a LAYOUT_WORDS <<<"$LAYOUT_ARGS"
if [ "$NODE_RANK" = 0 ]; then
  log "layout: $LAYOUT"
  [ -z "$LAYOUT_WAS" ] || log "the layout changed since the last start, which ran $LAYOUT_WAS"
fi

# ---- training ----

# torchrun's agent has no handler for SIGUSR2, whose default action would kill it,
# and Slurm may signal every process of the step, not only this script. So torchrun
# starts with USR2 ignored (the subshell sets that, then becomes torchrun); its
# workers inherit the setting until the trainer installs its own handler.
# --max-restarts=0: a worker that stops for a requeue must end the run, not restart.
(
  trap '' USR2
  exec "$TORCHRUN" \
    --nnodes="$NNODES" \
    --nproc-per-node=8 \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$RDZV_ID" \
    --max-restarts=0 \
    -m sfd_train.train /scratch/sfd/runs/slurm_ascend/launch/config.yaml parallel.backend=hccl run.device=npu "${LAYOUT_WORDS[@]}"
) &
TORCHRUN_PID=$!
if [ -n "$PREEMPTED" ]; then
  log "SIG$PREEMPTED came before training started: the workers will checkpoint and stop"
  deliver_preemption &
fi

# `wait` returns early (status > 128) whenever a trapped signal arrives; keep
# waiting until torchrun itself has exited.
while :; do
  wait "$TORCHRUN_PID"
  status=$?
  kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done

if [ "$status" -ne 0 ] && [ -f "$REQUEUE_FILE" ]; then
  log "the trainer saved a checkpoint and stopped for a requeue: $(cat "$REQUEUE_FILE")"
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    log "run the same sfd-launch command again to resume from that checkpoint"
  fi
  exit 0
fi
if [ -n "$PREEMPTED" ] && [ "$status" -ne 0 ]; then
  log "stopped after SIG$PREEMPTED without a complete checkpoint (no $REQUEUE_FILE)"
fi
log "torchrun exited with status $status"
exit "$status"
