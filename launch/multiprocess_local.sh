#!/usr/bin/env bash
# A multi-host run on one machine: N `flan-jax train` processes on fake CPU
# devices that form one JAX distributed run over localhost, to try multi-host
# code paths (global arrays, per-host input, shared checkpoints) without a pod.
#
#   bash launch/multiprocess_local.sh N [flan-jax train flags...]
#   bash launch/multiprocess_local.sh 2 --gin_file=runs/smoke.gin --gin_file=partitioning/fsdp.gin \
#     --gin.TrainConfig.num_steps=20 --gin.TrainConfig.input_sharding="'global_batch'"
#
# N         number of processes (required).
# flags     passed unchanged to every process's `flan-jax train` (--gin_file=F,
#           --gin.KEY=VALUE); none at all means --gin_file=runs/smoke.gin.
#           Bindings after the model_dir one below override it.
# Environment:
#   MODEL_DIR            run directory shared by all processes (default runs/multiprocess;
#                        passed as --gin.TrainConfig.model_dir before the flags).
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2): XLA_FLAGS gets
#                        --xla_force_host_platform_device_count=DEVICES_PER_PROCESS.
#   JAX_PLATFORMS        default cpu (GPUs, if any, are not split between processes).
#   COORDINATOR_PORT     localhost port of process 0's coordinator (default: a free one).
#   LOG_DIR              if set, also writes each process's raw output to LOG_DIR/process_<i>.log.
#   FLAN_JAX_NO_SETUP=1  use the `flan-jax` already on PATH instead of sourcing
#                        launch/setup_env.sh (which installs .venv if needed).
#
# It is the entry point launch/tpu_pod.sh and launch/gpu_cluster.sbatch use
# (`flan-jax train` with FLAN_JAX_DISTRIBUTED=1), with the coordinator, process
# count and process id given explicitly (FLAN_JAX_COORDINATOR_ADDRESS,
# FLAN_JAX_NUM_PROCESSES, FLAN_JAX_PROCESS_ID) where a pod or SLURM would
# provide them. Output lines are prefixed with [process <i>]. It waits for all
# processes; when one fails it stops the others and exits with its status.
# Ctrl-C or SIGTERM to the script (or SIGTERM to any one process) makes all of
# them save a checkpoint at the same step and exit 75; rerun to resume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$#" -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/multiprocess_local.sh N [flan-jax train flags...]" >&2
  exit 2
fi
NUM_PROCESSES="$1"
shift
if [ "${FLAN_JAX_NO_SETUP:-0}" != 1 ]; then
  source "$ROOT/launch/setup_env.sh"
fi
command -v flan-jax >/dev/null || { echo "flan-jax is not on PATH" >&2; exit 1; }
cd "$ROOT"
MODEL_DIR="${MODEL_DIR:-$ROOT/runs/multiprocess}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
[ "$#" -eq 0 ] && set -- --gin_file=runs/smoke.gin
PORT="${COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
[ -n "${LOG_DIR:-}" ] && mkdir -p "$LOG_DIR"

export FLAN_JAX_DISTRIBUTED=1
export FLAN_JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
export FLAN_JAX_NUM_PROCESSES="$NUM_PROCESSES"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
echo "[multiprocess_local] $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator $FLAN_JAX_COORDINATOR_ADDRESS, model_dir $MODEL_DIR"

# Each process leads a session of its own (setsid), so stopping it stops
# whatever it started too; Ctrl-C reaches only this script, which stops them.
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
declare -A running=()  # pid -> process index
stop_all() {  # $1: the signal
  for pid in "${!running[@]}"; do
    kill "-$1" -- "-$pid" 2>/dev/null || kill "-$1" "$pid" 2>/dev/null || true
  done
}
# Ctrl-C or SIGTERM: every process finishes its step, they save one checkpoint
# together and exit 75 (flan_jax/preemption.py); a second one kills them.
interrupted=0
on_signal() {
  if [ "$interrupted" -eq 1 ]; then stop_all KILL; exit 130; fi
  interrupted=1
  echo "[multiprocess_local] stopping: the processes save a checkpoint first (again to kill them)" >&2
  stop_all TERM
}
trap on_signal INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="/dev/null"
  [ -n "${LOG_DIR:-}" ] && log="$LOG_DIR/process_$i.log"
  # Python unbuffered and sed flushing each line keep the processes' lines interleaved as written.
  FLAN_JAX_PROCESS_ID="$i" PYTHONUNBUFFERED=1 \
    "${SETSID[@]}" flan-jax train --gin.TrainConfig.model_dir="'$MODEL_DIR'" "$@" \
    > >(tee "$log" | sed -u "s/^/[process $i] /") 2>&1 &
  running["$!"]="$i"
done

status=0
while [ "${#running[@]}" -gt 0 ]; do
  rc=0
  finished=""
  wait -n -p finished "${!running[@]}" || rc=$?
  if [ -z "$finished" ]; then
    [ "$interrupted" -eq 1 ] && continue  # woken by the signal: wait for the processes to save
    break  # nothing left to wait for
  fi
  index="${running[$finished]}"
  unset "running[$finished]"
  if [ "$rc" -eq 75 ]; then
    # Preempted after saving; the others stop at the same step.
    [ "$status" -eq 0 ] && status=75
  elif [ "$rc" -ne 0 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }; then
    status="$rc"
    echo "[multiprocess_local] process $index exited with status $rc; stopping the others" >&2
    stop_all TERM
  fi
done
wait  # the output filters
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
echo "[multiprocess_local] all $NUM_PROCESSES processes finished"
