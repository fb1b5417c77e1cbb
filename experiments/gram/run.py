"""GRAM end to end: data splits, stage-1 pair pretraining, stage-2 label-smoothed A/B fine-tuning,
baselines and swap-debiased evaluation, each stage one `rmjax` command (printed before it runs).

    python experiments/gram/run.py --config experiments/gram/cpu.yaml [--only STAGE ...]

Stages, in order (each resumable: a killed `rmjax train` / `rmjax score` resumes on re-run; a
finished one is skipped):
    data           disjoint seeded splits of bundled HH-RLHF pairs: pretrain.jsonl (labels unused),
                   finetune.jsonl, heldout.jsonl
    pretrain       rmjax train, head lm + loss nll (experiments/gram/pretrain.yaml) -> pretrain/final
    finetune       rmjax train, head judge + loss ce from pretrain/final (finetune.yaml) -> finetune/final
    finetune_only  the same fine-tuning from the base model (the baseline without stage 1)
    evaluate       rmjax score --judge on the held-out pairs and LLMBar for the fine-tuned judge, the
                   baseline and the zero-shot base model; results.json + results.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import yaml

from rmjax.data.records import read_records
from rmjax.jobs import score


def _armorm_driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("armorm_run", Path(__file__).resolve().parents[1] / "armorm" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = _armorm_driver().job  # print, run and time one rmjax job (the ArmoRM driver's)

STAGES = ("data", "pretrain", "finetune", "finetune_only", "evaluate")


def make_splits(cfg: dict, out: Path) -> dict[str, str]:
    """Seeded disjoint splits; every record keeps its HH-RLHF text, with its source line as id."""
    s = cfg["splits"]
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("pretrain", "finetune", "heldout")}
    if all(f.exists() for f in files.values()):
        return {name: str(f) for name, f in files.items()}
    records = read_records(f"hh-rlhf:{s['subset']}", on_error="skip")
    order = np.random.default_rng(s["seed"]).permutation(len(records))
    at = 0
    for name, f in files.items():
        rows = []
        for i in order[at:at + s[name]]:
            row = records[i].to_json()
            row["id"] = f"{s['subset']}:{records[i].place.rsplit(':', 1)[1]}"
            rows.append(row)
        at += s[name]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {f}: {len(rows)} pairs")
    return {name: str(f) for name, f in files.items()}


def train(config: str, overrides: list[str], log: dict, name: str) -> Path:
    import time

    from rmjax.train import loop
    from rmjax.train.config import load_config

    run = load_config(config, overrides)
    final = Path(run.run_dir) / "final"
    if (Path(run.run_dir) / "result.json").exists() and final.exists():
        print(f"\n{run.run_dir}: complete (rmjax train --config {config} {shlex.join(overrides)})")
    else:
        print(f"\n# {name}: rmjax train --config {config} {shlex.join(overrides)}", flush=True)
        t0 = time.perf_counter()
        loop.run(run, progress=False)
        log.setdefault("commands", {})[name] = {"config": config, "overrides": overrides,
                                                "seconds": round(time.perf_counter() - t0, 1)}
    log.setdefault("runs", {})[name] = {"config": config, "overrides": overrides,
                                        "result": json.loads((Path(run.run_dir) / "result.json").read_text()),
                                        "resolved": yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text())}
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/gram/cpu.yaml")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run these stages only")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    root = Path(cfg["out"])
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "summary.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["config"] = cfg
    todo = args.only or STAGES
    splits = make_splits(cfg, root / "data")
    data = [f"data.train=[{splits['pretrain']}]", f"data.eval=[{splits['heldout']}]"]
    pretrain_final = root / "pretrain" / "final"
    if "pretrain" in todo:
        pretrain_final = train(cfg["pretrain"], [f"run_dir={root / 'pretrain'}", *data], log, "pretrain")
    tune = [f"data.train=[{splits['finetune']}]", f"data.eval=[{splits['heldout']}]"]
    if "finetune" in todo:
        train(cfg["finetune"], [f"run_dir={root / 'finetune'}", f"model.name={pretrain_final}", *tune], log, "finetune")
    base = yaml.safe_load(Path(cfg["pretrain"]).read_text())["model"]["name"]
    if "finetune_only" in todo and cfg["baselines"].get("finetune_only"):
        train(cfg["finetune"], [f"run_dir={root / 'finetune_only'}", f"model.name={base}", *tune], log, "finetune_only")
    if "evaluate" in todo:
        judges = {"gram": str(root / "finetune" / "final"), "finetune_only": str(root / "finetune_only" / "final"),
                  "zero_shot": cfg["baselines"]["zero_shot"]}
        ev = cfg["eval"]
        results = log.setdefault("results", {})
        for name, judge in judges.items():
            if name != "zero_shot" and not Path(judge).exists():
                continue
            for dname, source in ev["data"].items():
                out = root / "eval" / f"{name}_{dname}"
                job(f"evaluate:{name}:{dname}", score.run, score.ScoreConfig,
                    {"model.judge": judge, "model.judge_template": "gram", "data.path": source,
                     "data.sample": ev["sample"], "data.max_length": ev["max_length"], "out": str(out),
                     "progress": False}, log)
                meta = json.loads((out / "metadata.json").read_text())
                results.setdefault(name, {})[dname] = {**meta["summary"], "out": str(out)}
        (root / "results.md").write_text(markdown(results))
        print(markdown(results))
    log_path.write_text(json.dumps(log, indent=2))
    print(f"\nwrote {log_path}", file=sys.stderr)
    return 0


def markdown(results: dict) -> str:
    lines = ["| judge | data | pairs | accuracy (swap-debiased log-odds) [95% CI] | GRAM's rule p(chosen) > 1/2 | "
             "mean position bias | time | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, per in results.items():
        for dname, s in per.items():
            lo, hi = s["judge_pairwise_accuracy_ci95"]
            lines.append(f"| {name} | {dname} | {s['judge_pairs']} | {s['judge_pairwise_accuracy']:.3f} "
                         f"[{lo:.3f}, {hi:.3f}] | {s['judge_p_chosen_accuracy']:.3f} | "
                         f"{s['judge_mean_position_bias']:+.3f} | {s['run']['seconds'] / 60:.1f} min | "
                         f"{s['run']['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
