#!/usr/bin/env bash
# The short real CPU runs of every head x loss (README.md). Re-running resumes or skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
python experiments/rm_heads/make_ratings.py
for cfg in scalar_bt multi_objective_mse armorm_bt judge_ce lm_dpo; do
  if [ -f "runs/rm_heads/$cfg/result.json" ]; then echo "done: $cfg"; continue; fi
  /usr/bin/time -v rmjax train --config "experiments/rm_heads/$cfg.yaml" --no-progress 2> "runs/rm_heads/$cfg.log.txt" \
    || { tail -20 "runs/rm_heads/$cfg.log.txt"; exit 1; }
  tail -3 "runs/rm_heads/$cfg.log.txt"
done
# the results README.md's table is rendered from (python tools/readme_tables.py)
mkdir -p experiments/rm_heads/results
for cfg in scalar_bt multi_objective_mse armorm_bt judge_ce lm_dpo; do
  cp "runs/rm_heads/$cfg/result.json" "experiments/rm_heads/results/$cfg.json"
done
