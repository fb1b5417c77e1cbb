"""Reward-model ablation sweep: base model x data source x data quantity x seed.

    python experiments/rm_ablation/sweep.py [--models smollm2-135m-instruct gemma3-270m]
        [--sources hh-rlhf:helpful hh-rlhf:harmless my_prefs.jsonl ...] [--fractions 0.25 0.5 1.0] [--seeds 0]
        [--base experiments/rm_ablation/base.yaml] [--root runs/rm_ablation] [--value-scores] [--trajectories]
        [key=value ...]

A source is anything `rmjax train` reads as data.train (jsonl / parquet / a datasets directory,
hh-rlhf[:SUBSETS], llmbar[:SUBSETS]); several inputs for one source are joined with "+", e.g.
"a.jsonl+b.parquet". Each cell is one `rmjax train` run in its own process (a crash does not end the
sweep) under ROOT/<model>/<source tag>/f<fraction>/s<seed> (the tag: the subsets after "hh-rlhf:",
else the file stems); a cell whose result.json exists is skipped, and a killed
cell resumes from its last checkpoint. Final metrics are collected into ROOT/results.csv and .md.

Quantity: base.yaml sets train.epochs, so a cell's steps are epochs x (its fraction of the pool) /
batch size: a smaller fraction trains on fewer distinct pairs for proportionally fewer steps (the
columns distinct_pairs and presentations of results.csv show it). Override train.epochs=0
train.steps=N to fix the number of steps instead.

--value-scores: every seed-0 RM then scores the Big Two nouns as one-word answers to the value
prompts (`rmjax vocab-scan --mode words --rm RUN/final`), one table per RM in ROOT/value_scores/
(the schema of the released RM scores) with ROOT/value_scores_families.csv (RM -> base model
family), ready for `rmjax value-bias`; a table already written is kept.

--trajectories: every seed-0 RM also scores the Big Two nouns at every saved checkpoint (base.yaml
keeps them all: train.keep_checkpoints 0), one table per step in ROOT/value_trajectory/<RM>/, then
ROOT/value_trajectory.csv (mean median rank per RM, step, framing and category),
ROOT/value_trajectory_difference.csv (the family difference over training progress) and
ROOT/value_trajectory.png (Christian et al., Figure 4a).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import pandas as pd

from rmjax import config as rconfig
from rmjax.errors import RmjaxError
from rmjax.jobs import vocab_scan
from rmjax.train import config as tconfig
from rmjax.train import loop
from rmjax.jobs.vocab_scan import VocabScanConfig


def source_tag(source: str) -> str:
    parts = []
    for item in source.split("+"):
        name = item.partition(":")[2] if item.startswith(("hh-rlhf:", "llmbar:")) else Path(item).name.split(".")[0]
        parts.append(name.replace(",", "-") or item)
    return "+".join(parts)


def cells(args):
    for model, source, fraction, seed in itertools.product(args.models, args.sources, args.fractions, args.seeds):
        tag = Path(model).name if ("/" in model or model.endswith(".gguf")) else model  # a path: its last part
        run_dir = Path(args.root) / tag / source_tag(source) / f"f{fraction:g}" / f"s{seed}"
        inputs = json.dumps(source.split("+"))
        overrides = [f"model.name={model}", f"data.train={inputs}", f"data.fraction={fraction}",
                     f"train.seed={seed}", f"run_dir={run_dir}", *args.overrides]
        yield dict(model=model, source=source, fraction=fraction, seed=seed), run_dir, overrides


def value_scores(root: Path, done: list[tuple[dict, Path]], prompt_keys: list[str] | None) -> list[str]:
    """Seed-0 RMs' scores of the Big Two nouns on the value prompts; returns the failed runs."""
    from rmjax.analysis.families import infer_family

    out = root / "value_scores"
    out.mkdir(exist_ok=True)
    families, failed = [], []
    for keys, run_dir in done:
        if keys["seed"] != 0:
            continue
        name = "_".join(run_dir.relative_to(root).parts[:-1])  # model_source_fraction
        target = out / f"{name}.csv"
        if not target.exists():
            print(f"value scores: {run_dir}", flush=True)
            scan = root / "value_scan" / name
            config = rconfig.load(VocabScanConfig, None, ["model.name=", f"rm={run_dir / 'final'}", "mode=words",
                                                          "words=big2_nouns", f"out={scan}"])
            config.prompt_keys = tuple(prompt_keys or ())
            try:
                vocab_scan.run(config)
            except RmjaxError as e:
                print(f"value scores of {run_dir} failed: {e}", flush=True)
                failed.append(str(run_dir))
                continue
            (scan / "words_rm.csv").replace(target)
        families.append({"model": name, "family": infer_family(Path(keys["model"]).name) or Path(keys["model"]).name})
    pd.DataFrame(families).to_csv(root / "value_scores_families.csv", index=False)
    print(f"value scores in {out}; analyse with: rmjax value-bias --scores {out} --dictionary big2_nouns "
          f"--families {root / 'value_scores_families.csv'} --out {root / 'value_bias'}")
    return failed


def trajectories(root: Path, done: list[tuple[dict, Path]], prompt_keys: list[str] | None,
                 dictionary: str = "big2_nouns") -> pd.DataFrame:
    """Big Two noun scores of every seed-0 RM at every saved checkpoint, and the family trajectory."""
    from rmjax.analysis import load_dictionary
    from rmjax.analysis.families import infer_family
    from rmjax.analysis.trajectory import family_difference, plot_trajectory, trajectory
    from rmjax.data.preferences import load_value_prompts
    from rmjax.models.loading import load_model
    from rmjax.scoring.vocab_scan import word_scores
    from rmjax.train.checkpoints import checkpoint_model, saved_steps
    from rmjax.train.config import load_config

    lexicon = load_dictionary(dictionary)
    prompts = load_value_prompts()
    if prompt_keys:
        prompts = {k: prompts[k] for k in prompt_keys}
    tables, families, bases = {}, {}, {}
    for keys, run_dir in done:
        if keys["seed"] != 0:
            continue
        name = "_".join(run_dir.relative_to(root).parts[:-1])
        families[name] = infer_family(Path(keys["model"]).name) or Path(keys["model"]).name
        run = load_config(run_dir / "config.yaml")
        for step in saved_steps(run_dir):
            target = root / "value_trajectory" / name / f"step{step}.csv"
            if not target.exists():
                print(f"trajectory: {run_dir} step {step}", flush=True)
                if keys["model"] not in bases:
                    bases[keys["model"]] = load_model(keys["model"], lm_head=False)
                model = checkpoint_model(run_dir, step, bases[keys["model"]])
                table = word_scores(model, prompts, lexicon.words, run.data.template, "plain", rm=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                table.to_csv(target, index=False)
            tables[name, step] = pd.read_csv(target, keep_default_na=False)
    if not tables:
        return pd.DataFrame()
    points = trajectory(tables, families, lexicon)
    difference = family_difference(points)
    points.to_csv(root / "value_trajectory.csv", index=False)
    difference.to_csv(root / "value_trajectory_difference.csv", index=False)
    plot_trajectory(points, difference, root / "value_trajectory")
    print(f"value trajectories in {root / 'value_trajectory.csv'} and {root / 'value_trajectory.png'}")
    return points


def collect(root: Path, rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.to_csv(root / "results.csv", index=False)
    (root / "results.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--sources", nargs="+", default=["hh-rlhf:helpful", "hh-rlhf:harmless", "hh-rlhf:both"],
                    help='data.train inputs per source; join several inputs of one source with "+"')
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--base", default=str(Path(__file__).with_name("base.yaml")))
    ap.add_argument("--root", default="runs/rm_ablation")
    ap.add_argument("--value-scores", action="store_true",
                    help="score the Big Two nouns on the value prompts with every seed-0 RM")
    ap.add_argument("--trajectories", action="store_true",
                    help="score the Big Two nouns with every seed-0 RM at every saved checkpoint and plot the "
                         "family difference over training")
    ap.add_argument("--value-prompt-keys", help="only these value prompts, comma-separated (default all 54)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows, failed, done = [], [], []
    for keys, run_dir, overrides in cells(args):
        result_file = run_dir / "result.json"
        if result_file.exists():
            print(f"skip (complete): {run_dir}")
        else:
            print(f"run: {run_dir}", flush=True)
            try:
                loop.run(tconfig.load_config(args.base, overrides), progress=False)
            except RmjaxError as e:
                print(f"run {run_dir} failed: {e}", flush=True)
            if not result_file.exists():
                failed.append(str(run_dir))
                continue
        done.append((keys, run_dir))
        result = json.loads(result_file.read_text())
        ev = result.get("eval", {})
        rows.append({**keys, "train_examples": result["train_examples"], "steps": result["step"],
                     "distinct_pairs": result.get("distinct_train_examples"),
                     "presentations": result.get("pair_presentations"),
                     "eval_accuracy": ev.get("accuracy"), "eval_margin": ev.get("margin"),
                     **{k: v for k, v in ev.items() if k.startswith("accuracy/")}})
    if rows:
        print(collect(root, rows).to_string(index=False))
    keys = [k.strip() for k in args.value_prompt_keys.split(",") if k.strip()] if args.value_prompt_keys else None
    if args.value_scores:
        failed += value_scores(root, done, keys)
    if args.trajectories:
        trajectories(root, done, keys)
    if failed:
        print(f"{len(failed)} runs failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
