#!/usr/bin/env bash
# Run one rmjax command on every worker of a Cloud TPU VM pod slice (multi-host).
#   tpu/launch.sh [--dry-run] TPU_NAME ZONE COMMAND [PROJECT]
#   tpu/launch.sh my-v5e-32 us-west4-a "rmjax train --config experiments/rm_ablation/base.yaml"
# Copies exactly the files git sees in this checkout (`git ls-files --cached --others
# --exclude-standard`: not a local .venv, runs/ or any ignored file) to ~/$REPO_DIR (default rmjax)
# on every worker, creates a venv there once (pip install -e . 'jax[tpu]') and runs COMMAND on all
# workers at once; rmjax calls jax.distributed.initialize() itself (rmjax/distributed.py)
# and shards data per process.
# --dry-run prints the gcloud commands, one a line and quoted for a shell, and runs nothing.
set -euo pipefail

usage() {
  [ $# -eq 0 ] || echo "$0: $1" >&2
  echo "usage: $0 [--dry-run] TPU_NAME ZONE COMMAND [PROJECT]" >&2
  exit 2
}

# One word for a POSIX shell: as it is when it is plain, else in single quotes.
quote() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_@%+=:,./-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

dry_run=0
run() {
  if [ "$dry_run" = 1 ]; then
    local words=() a
    for a in "$@"; do words+=("$(quote "$a")"); done
    printf '%s\n' "${words[*]}"
  else
    "$@"
  fi
}

while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    -h|--help) echo "usage: $0 [--dry-run] TPU_NAME ZONE COMMAND [PROJECT]"; exit 0 ;;
    --) shift; break ;;
    -*) usage "unknown option: $1" ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ] || [ $# -gt 4 ]; then usage "expected TPU_NAME ZONE COMMAND [PROJECT], got $# argument(s)"; fi
TPU_NAME=$1; ZONE=$2; CMD=$3; PROJECT=${4:-}
if [ -z "$TPU_NAME" ] || [ -z "$ZONE" ]; then usage "TPU_NAME and ZONE must not be empty"; fi
if [ -z "${CMD//[[:space:]]/}" ]; then usage "COMMAND must not be empty"; fi
for a in "$TPU_NAME" "$ZONE" "$PROJECT"; do
  case $a in -*) usage "'$a' is not a TPU name, zone or project: options go before TPU_NAME" ;; esac
done
REPO_DIR=${REPO_DIR:-rmjax}
proj=()
[ -n "$PROJECT" ] && proj=(--project "$PROJECT")

here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
ROOT=$(git -C "$here" rev-parse --show-toplevel)
if [ "$dry_run" = 0 ] && ! command -v gcloud >/dev/null; then
  echo "$0: gcloud not found on PATH: install the Google Cloud CLI (or use --dry-run to see the commands)" >&2
  exit 1
fi

# Exactly the files git sees (tracked ones and untracked ones it does not ignore: no local .venv,
# runs/ or caches, nested ignored files included), as one tarball unpacked over ~/$REPO_DIR, so that
# a later launch updates the same tree (files deleted here stay there; nothing else is touched).
work=$(mktemp -d "${TMPDIR:-/tmp}/rmjax-launch.XXXXXX")
list=$work/files
git -C "$ROOT" ls-files -z --cached --others --exclude-standard > "$list"
tarball=$work/rmjax-src.tar.gz
run tar -czf "$tarball" -C "$ROOT" --null --files-from "$list"
remote="set -e; mkdir -p ~/$REPO_DIR; tar -xzf ~/rmjax-src.tar.gz -C ~/$REPO_DIR; rm ~/rmjax-src.tar.gz;"
remote+=" cd ~/$REPO_DIR; [ -d .venv ] || (python3 -m venv .venv && . .venv/bin/activate"
remote+=" && pip install -q -e . 'jax[tpu]'); . .venv/bin/activate && $CMD"

ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone "$ZONE" ${proj[@]+"${proj[@]}"})
run gcloud compute tpus tpu-vm scp --worker=all --zone "$ZONE" ${proj[@]+"${proj[@]}"} \
  "$tarball" "$TPU_NAME:~/rmjax-src.tar.gz"
run "${ssh[@]}" --command "$remote"
# the file list stays for --dry-run (the printed tar command reads it); a real launch cleans up
[ "$dry_run" = 1 ] || rm -rf "$work"
