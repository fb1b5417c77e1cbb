#!/usr/bin/env bash
# Run one rmjax command on every worker of a Cloud TPU VM pod slice (multi-host).
#   tpu/launch.sh TPU_NAME ZONE "rmjax train --config experiments/rm_ablation/base.yaml"
# Each worker installs the checked-out tree (once) and runs the same command; rmjax calls
# jax.distributed.initialize() itself (rmjax/distributed.py) and shards data per process.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND [PROJECT]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CMD=$3; PROJECT=${4:-}
REPO_DIR=${REPO_DIR:-rmjax}
proj=()
[ -n "$PROJECT" ] && proj=(--project "$PROJECT")

gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" "${proj[@]}" \
  "$(git rev-parse --show-toplevel)" "$TPU_NAME:~/$REPO_DIR"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone "$ZONE" "${proj[@]}" --command "
  set -e; cd ~/$REPO_DIR
  [ -d .venv ] || (python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]')
  . .venv/bin/activate && $CMD"
