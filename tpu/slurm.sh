#!/usr/bin/env bash
# Submit one rmjax command as a multi-node SLURM job on a GPU cluster: one process per node, each
# with all of its node's GPUs; rmjax calls jax.distributed.initialize() (rmjax/distributed.py),
# which reads the job's layout from SLURM, so no RMJAX_* variables are needed.
#   tpu/slurm.sh [options] -- COMMAND...
#   tpu/slurm.sh --nodes 4 --partition gpu --time 12:00:00 -- rmjax train --config experiments/rm_ablation/base.yaml
# The batch script activates a venv (default: this checkout's .venv, which must be on a file
# system the nodes share), copies XLA_FLAGS, RMJAX_INIT_TIMEOUT and the JAX_* / NCCL_* variables
# set here into the job, and runs COMMAND with srun in the directory tpu/slurm.sh was started from.
# --dry-run prints the batch script and the sbatch command that would submit it, and submits nothing.
set -euo pipefail

USAGE="usage: $0 [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--time TIME] [--account A]
       [--venv PATH] [--job-name NAME] [--output PATH] [--cpus-per-task C] [--exclusive] [--sbatch ARG]...
       -- COMMAND...
  --nodes N          nodes, one process each (default 1)
  --gpus-per-node G  GPUs per node, all visible to its process (default 8; 0: none requested)
  --partition P, --account A, --time TIME (HH:MM:SS, D-HH:MM:SS or minutes), --cpus-per-task C,
  --exclusive        passed to sbatch as #SBATCH lines
  --venv PATH        venv to activate on every node (default: this checkout's .venv)
  --job-name NAME    default rmjax; --output PATH: the job's log, default logs/%x-%j.out
  --sbatch ARG       one more #SBATCH option, e.g. --sbatch --qos=high (repeatable)
  --dry-run          print the batch script and the sbatch command; submit nothing"

usage() {
  [ $# -eq 0 ] || echo "$0: $1" >&2
  echo "$USAGE" >&2
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

here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
ROOT=$(cd "$here/.." && pwd)

dry_run=0; nodes=1; gpus=8; partition=; time_limit=; account=; cpus=; exclusive=0
venv=$ROOT/.venv; job_name=rmjax; output=logs/%x-%j.out
extra=()
while [ $# -gt 0 ]; do
  opt=$1; val=
  case $opt in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; has_val=1 ;;
    *) has_val=0 ;;
  esac
  case $opt in
    --nodes|--gpus-per-node|--partition|--time|--account|--venv|--job-name|--output|--cpus-per-task|--sbatch)
      if [ "$has_val" = 0 ]; then
        [ $# -ge 2 ] || usage "$opt needs a value"
        val=$2; shift
      fi
      [ -n "$val" ] || usage "$opt needs a value"
      case $val in *$'\n'*) usage "$opt: the value must be one line" ;; esac ;;
    --dry-run|--exclusive|-h|--help)
      [ "$has_val" = 0 ] || usage "$opt takes no value" ;;
  esac
  case $opt in
    --dry-run) dry_run=1 ;;
    --exclusive) exclusive=1 ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    --nodes) nodes=$val ;;
    --gpus-per-node) gpus=$val ;;
    --partition) partition=$val ;;
    --time) time_limit=$val ;;
    --account) account=$val ;;
    --venv) venv=$val ;;
    --job-name) job_name=$val ;;
    --output) output=$val ;;
    --cpus-per-task) cpus=$val ;;
    --sbatch) extra+=("$val") ;;
    --) shift; break ;;
    -*) usage "unknown option: $opt" ;;
    *) break ;;
  esac
  shift
done
[ $# -gt 0 ] || usage "no command to run: give it after --, e.g. -- rmjax train --config CONFIG"

[[ $nodes =~ ^[1-9][0-9]*$ ]] || usage "--nodes $nodes: a positive integer"
[[ $gpus =~ ^[0-9]+$ ]] || usage "--gpus-per-node $gpus: an integer >= 0"
[ -z "$cpus" ] || [[ $cpus =~ ^[1-9][0-9]*$ ]] || usage "--cpus-per-task $cpus: a positive integer"
[ -z "$time_limit" ] || [[ $time_limit =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] \
  || usage "--time $time_limit: HH:MM:SS, D-HH:MM:SS or minutes"
for v in "$partition" "$account" "$job_name" "$output"; do
  case $v in *[[:space:]]*) usage "'$v': names and the log path must not contain spaces" ;; esac
done
case $venv in /*) ;; *) venv=$PWD/$venv ;; esac

cmd=()
for a in "$@"; do cmd+=("$(quote "$a")"); done

# The batch script: every line printed here is what sbatch receives.
batch_script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=1"
  [ "$gpus" = 0 ] || echo "#SBATCH --gpus-per-node=$gpus"
  [ -z "$cpus" ] || echo "#SBATCH --cpus-per-task=$cpus"
  [ -z "$partition" ] || echo "#SBATCH --partition=$partition"
  [ -z "$account" ] || echo "#SBATCH --account=$account"
  [ -z "$time_limit" ] || echo "#SBATCH --time=$time_limit"
  [ "$exclusive" = 0 ] || echo "#SBATCH --exclusive"
  echo "#SBATCH --output=$output"
  local x name
  for x in ${extra[@]+"${extra[@]}"}; do echo "#SBATCH $x"; done
  echo "set -euo pipefail"
  echo "cd $(quote "$PWD")"
  echo "set +u; . $(quote "$venv/bin/activate"); set -u"
  echo "# jax.distributed.initialize() takes the coordinator, process count and ids from SLURM."
  echo "unset RMJAX_COORDINATOR RMJAX_NUM_PROCESSES RMJAX_PROCESS_ID"
  if [ "$gpus" != 0 ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
    echo "# One process per node keeps all the node's GPUs (by default JAX gives it only GPU \$SLURM_LOCALID)."
    local ids=0 i
    for ((i = 1; i < gpus; i++)); do ids+=",$i"; done
    echo "export JAX_LOCAL_DEVICE_IDS=$ids"
  fi
  while IFS= read -r name; do
    case $name in
      XLA_FLAGS|JAX_*|NCCL_*|RMJAX_INIT_TIMEOUT) echo "export $name=$(quote "${!name}")" ;;
    esac
  done < <(compgen -e | LC_ALL=C sort)
  echo "echo \"rmjax: job \$SLURM_JOB_ID, \$SLURM_JOB_NUM_NODES node(s): \$SLURM_JOB_NODELIST\""
  echo "srun --kill-on-bad-exit=1 ${cmd[*]}"
}

log_dir=
case $output in */*) log_dir=${output%/*} ;; esac
case $log_dir in *%*) log_dir= ;; esac  # a directory named by a pattern is the user's to create

script=$(batch_script)
if [ "$dry_run" = 1 ]; then
  [ -z "$log_dir" ] || echo "mkdir -p $(quote "$log_dir")"
  echo "sbatch --parsable <<'RMJAX_BATCH_SCRIPT'"
  printf '%s\n' "$script"
  echo "RMJAX_BATCH_SCRIPT"
  exit 0
fi

if ! command -v sbatch >/dev/null; then
  echo "$0: sbatch not found on PATH: run this on a SLURM login node (or use --dry-run to see the job)" >&2
  exit 1
fi
if [ ! -f "$venv/bin/activate" ]; then
  echo "$0: no venv at $venv (create it on a file system the nodes share, or give --venv PATH)" >&2
  exit 1
fi
[ -z "$log_dir" ] || mkdir -p "$log_dir"
job=$(printf '%s\n' "$script" | sbatch --parsable)
job=${job%%;*}
log=${output//%x/$job_name}
echo "submitted job $job ($nodes node(s) x $gpus GPU(s)); log: ${log//%j/$job}"
