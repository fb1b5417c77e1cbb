"""Reward-model ablation sweep: base model x data source x data quantity x seed.

    python experiments/rm_ablation/sweep.py [--models smollm2-135m-instruct gemma3-270m]
        [--sources helpful harmless both] [--fractions 0.25 0.5 1.0] [--seeds 0]
        [--base experiments/rm_ablation/base.yaml] [--root runs/rm_ablation] [key=value ...]

Each cell is one `rmjax train` run in its own process (a crash does not end the sweep) under
ROOT/<model>/<source>/f<fraction>/s<seed>; a cell whose result.json exists is skipped, and a killed
cell resumes from its last checkpoint. Final metrics are collected into ROOT/results.csv and .md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd


def cells(args):
    for model, source, fraction, seed in itertools.product(args.models, args.sources, args.fractions, args.seeds):
        tag = Path(model).name if ("/" in model or model.endswith(".gguf")) else model  # a path: its last part
        run_dir = Path(args.root) / tag / source / f"f{fraction:g}" / f"s{seed}"
        overrides = [f"model.name={model}", f"data.source={source}", f"data.fraction={fraction}",
                     f"train.seed={seed}", f"run_dir={run_dir}", *args.overrides]
        yield dict(model=model, source=source, fraction=fraction, seed=seed), run_dir, overrides


def collect(root: Path, rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.to_csv(root / "results.csv", index=False)
    (root / "results.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--sources", nargs="+", default=["helpful", "harmless", "both"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--base", default=str(Path(__file__).with_name("base.yaml")))
    ap.add_argument("--root", default="runs/rm_ablation")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for keys, run_dir, overrides in cells(args):
        result_file = run_dir / "result.json"
        if result_file.exists():
            print(f"skip (complete): {run_dir}")
        else:
            print(f"run: {run_dir}", flush=True)
            cmd = [sys.executable, "-m", "rmjax.cli", "train", "--config", args.base, "--no-progress", *overrides]
            if subprocess.run(cmd).returncode != 0 or not result_file.exists():
                failed.append(str(run_dir))
                continue
        result = json.loads(result_file.read_text())
        ev = result.get("eval", {})
        rows.append({**keys, "train_pairs": result["train_pairs"], "steps": result["step"],
                     "eval_accuracy": ev.get("accuracy"), "eval_margin": ev.get("margin"),
                     **{k: v for k, v in ev.items() if k.startswith("accuracy/")}})
    if rows:
        print(collect(root, rows).to_string(index=False))
    if failed:
        print(f"{len(failed)} runs failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
