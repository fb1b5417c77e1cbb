#!/usr/bin/env bash
# Re-runs the commands behind README.md's result tables and keeps their results files where
# tools/readme_tables.py reads them (experiments/*/results/), then re-renders the tables.
#   tools/readme_results.sh [main_job] [cpu_short] [rm_heads] [gram]     (default: all four)
# Times on a 2-core CPU: main_job 8 min, cpu_short 25 min, rm_heads 65 min, gram 50 min.
# The value-bias table reads experiments/value_bias/results/ (experiments/value_bias/reproduce.py).
set -euo pipefail
cd "$(dirname "$0")/.."
summary() {  # the summary of an rmjax score run directory
  python -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["summary"], indent=1))' "$1/metadata.json"
}
for what in "${@:-main_job cpu_short rm_heads gram}"; do
  for job in $what; do
    case "$job" in
      main_job)
        mkdir -p experiments/irm/results
        rmjax score --out runs/readme/score --overwrite --no-progress
        summary runs/readme/score > experiments/irm/results/score.json
        rmjax score --cross-family --out runs/readme/score_cross_family --overwrite --no-progress
        summary runs/readme/score_cross_family > experiments/irm/results/score_cross_family.json ;;
      cpu_short)
        mkdir -p experiments/rm_ablation/results
        rm -rf runs/cpu_short
        rmjax train --config experiments/rm_ablation/cpu_short.yaml --no-progress
        cp runs/cpu_short/result.json experiments/rm_ablation/results/cpu_short.json ;;
      rm_heads)
        rm -rf runs/rm_heads
        mkdir -p runs/rm_heads
        experiments/rm_heads/run_cpu.sh ;;
      gram)
        rm -rf runs/gram
        python experiments/gram/run.py --config experiments/gram/cpu.yaml
        mkdir -p experiments/gram/results
        cp runs/gram/summary.json experiments/gram/results/summary.json ;;
      *) echo "unknown table $job: main_job, cpu_short, rm_heads or gram" >&2; exit 2 ;;
    esac
  done
done
python tools/readme_tables.py
