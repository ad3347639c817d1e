#!/usr/bin/env bash
# Launches `flan-jax train` on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b MODEL_DIR=gs://bucket/flan_base \
#     bash launch/tpu_pod.sh --gin_file=models/flan_t5_base.gin --gin_file=runs/finetune.gin \
#       --gin.TrainConfig.mixture_or_task_name="'builtin_train'"
#
# Copies this checkout to each worker, installs it with jax[tpu], and starts
# one process per host; jax.distributed.initialize() finds the pod's
# coordinator by itself (FLAN_JAX_DISTRIBUTED=1). MODEL_DIR must be on GCS so
# all hosts share checkpoints.
#
# Flags: all arguments go unchanged to `flan-jax train` on every host
# (--gin_file=F, --gin.KEY=VALUE), after --gin.TrainConfig.model_dir=MODEL_DIR.
# Environment (here, not on the workers):
#   TPU_NAME, ZONE  the TPU VM slice (required).
#   MODEL_DIR       gs:// run directory shared by all hosts (required).
#   REMOTE_DIR      where the checkout goes on each worker (default ~/flan-jax).
# Each host feeds its rows of the global batch (TrainConfig.input_sharding).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${MODEL_DIR:?set MODEL_DIR (gs://...)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-flan-jax}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

tar -C "$ROOT" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/flan-jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/flan-jax.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/flan-jax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && \
  source launch/setup_env.sh && pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
args=$(printf ' %q' "$@")
ssh_all "cd ~/$REMOTE_DIR && FLAN_JAX_DISTRIBUTED=1 .venv/bin/flan-jax train --gin.TrainConfig.model_dir=\"'$MODEL_DIR'\"$args"
