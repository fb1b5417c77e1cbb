"""ArmoRM end to end: feature caches, stage-1 regression, verbosity debiasing, stage-2 gate,
evaluation and export, each stage one rmjax job (``rmjax.jobs``; its config printed before it runs,
the same as the `rmjax` command with those keys).

    python experiments/armorm/run.py --config experiments/armorm/cpu.yaml [--only STAGE ...] [--check-export]

Stages, in order (every one resumable; a finished one is skipped on re-run):
    data        disjoint seeded splits of the bundled HH-RLHF helpful-base and harmless-base pairs:
                stage1.jsonl / stage2.jsonl / heldout.jsonl, subsets "helpful" and "harmless"
    features    rmjax features for stage1, stage2, heldout and LLMBar (the frozen backbone, once)
    regression  rmjax armorm regression: helpful and harmless pairs as ratings (chosen 1, rejected 0),
                plus the measured verbosity (log response tokens)
    debias      rmjax armorm debias on the stage-2 responses (the authors' reference set defaults to
                the preference set)
    gate        rmjax armorm gate on the stage-2 pairs
    evaluate    rmjax armorm evaluate on held-out HH pairs and LLMBar
    export      rmjax armorm export: the released ArmoRM layout, loadable by rmjax eval-rm
With --check-export, `rmjax eval-rm` scores LLMBar Natural with the exported model (the backbone runs
again) and the accuracy is compared with the cached evaluation's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from rmjax import config as rconfig
from rmjax.data.records import read_records
from rmjax.jobs import armorm as armorm_jobs
from rmjax.jobs import eval_rm, features

STAGES = ("data", "features", "regression", "debias", "gate", "evaluate", "export")
# the experiment config's feature settings -> FeaturesConfig keys
FEATURE_KEYS = {"max_length": "data.max_length", "pack_length": "batch.row_length", "batch_tokens": "batch.batch_tokens",
                "shard_size": "shard_size"}


def job(name: str, run, cls: type, keys: dict, log: dict):
    """Run one job on the config ``keys`` give (printed first as the command's key=value form)."""
    config = rconfig.validate(rconfig.apply(cls(), None, []), name)
    for key, value in keys.items():
        rconfig.set_key(config, key, list(value) if isinstance(value, tuple) else value, name)
    config = rconfig.validate(config, name)
    print(f"\n# {name}: {' '.join(f'{k}={v}' for k, v in keys.items())}", flush=True)
    t0 = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - t0
    log.setdefault("commands", {})[name] = {"config": rconfig.plain(config), "seconds": round(seconds, 1)}
    return result


def make_splits(cfg: dict, out: Path) -> dict:
    """Seeded disjoint splits per objective; every record keeps its HH-RLHF text and place."""
    s = cfg["splits"]
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("stage1", "stage2", "heldout")}
    if all(f.exists() for f in files.values()):
        return {name: str(f) for name, f in files.items()}
    rows: dict[str, list] = {name: [] for name in files}
    for objective, subset in s["objectives"].items():
        records = read_records(f"hh-rlhf:{subset}", on_error="skip")  # 13 helpful-base pairs have an empty reply
        order = np.random.default_rng(s["seed"]).permutation(len(records))
        at = 0
        for name in files:
            for i in order[at:at + s[name]]:
                row = records[i].to_json()
                row.update(id=f"{subset}:{records[i].place.rsplit(':', 1)[1]}", subset=objective)
                rows[name].append(row)
            at += s[name]
    for name, f in files.items():
        f.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        print(f"wrote {f}: {len(rows[name])} pairs")
    return {name: str(f) for name, f in files.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/armorm/cpu.yaml")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run these stages only")
    ap.add_argument("--check-export", action="store_true")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    root = Path(cfg["out"])
    root.mkdir(parents=True, exist_ok=True)
    summary_path = Path(cfg.get("stages_dir", root)) / "summary.json"
    log = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    log["config"] = cfg
    todo = args.only or STAGES
    feat = {name: root / "features" / name for name in ("stage1", "stage2", "heldout", "llmbar")}
    stages_root = Path(cfg.get("stages_dir", root))  # a variant of the stages shares the feature caches
    stages_root.mkdir(parents=True, exist_ok=True)
    stage1, debias, gate, final = (stages_root / n for n in ("stage1", "debias", "gate", "final"))
    model = cfg["model"]

    splits = make_splits(cfg, root / "data") if "data" in todo or "features" in todo else None
    if "features" in todo:
        data = {**splits, "llmbar": cfg["eval"]["llmbar"]}
        for name, path in feat.items():
            f = cfg["features"] | cfg.get("features_" + name, {})
            keys = {"model.name": model, "data.path": data[name], "out": str(path), "progress": False,
                    **{FEATURE_KEYS[k]: v for k, v in f.items()}}
            done = (path / "metadata.json").exists() and json.loads((path / "metadata.json").read_text())["status"] == "complete"
            if done:
                print(f"\n{path}: complete")
                continue
            meta = job(f"features:{name}", features.run, features.FeaturesConfig, keys, log)
            log.setdefault("features", {})[name] = {"counts": meta["counts"], "throughput": meta["throughput"]}
    if "regression" in todo:
        r = cfg["regression"]
        job("regression", armorm_jobs.regression, armorm_jobs.RegressionConfig,
            {"cache": str(feat["stage1"]), "out": str(stage1),
             "pair_objectives": tuple(f"{subset}={subset}" for subset in cfg["splits"]["objectives"]),
             "verbosity": r["verbosity"], "pair_loss": r.get("pair_loss", "ridge")}, log)
    if "debias" in todo:
        job("debias", armorm_jobs.debias, armorm_jobs.DebiasConfig,
            {"stage1": str(stage1), "reference": str(feat["stage2"]), "out": str(debias),
             "verbosity": cfg["regression"]["verbosity"], "threshold": cfg["debias"]["threshold"]}, log)
    if "gate" in todo:
        job("gate", lambda c: armorm_jobs.gate(c, log=print), armorm_jobs.GateConfig,
            {"stage1": str(stage1), "debias": str(debias), "pairs": str(feat["stage2"]), "out": str(gate),
             **{f"settings.{k}": v for k, v in cfg["gate"].items()}}, log)
    stages = {"stages.stage1": str(stage1), "stages.debias": str(debias), "stages.gate": str(gate)}
    if "evaluate" in todo:
        reports = job("evaluate", armorm_jobs.evaluate, armorm_jobs.EvaluateConfig,
                      {**stages, "caches": (str(feat["heldout"]), str(feat["llmbar"])),
                       "out": str(stages_root / "eval.json")}, log)
        for cache, rep in reports.items():
            lo, hi = rep["ci95"]
            print(f"{cache}: accuracy {rep['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {rep['examples']} examples")
    if "export" in todo:
        job("export", armorm_jobs.export, armorm_jobs.ExportConfig, {**stages, "model": model, "out": str(final)}, log)
    if args.check_export:
        job("check-export", eval_rm.run, eval_rm.EvalConfig,
            {"model.name": str(final), "data.paths": ("llmbar:Natural",),
             "data.max_length": cfg["features_llmbar"]["max_length"], "out": str(stages_root / "eval_rm_natural.json")},
            log)
        exported = json.loads((stages_root / "eval_rm_natural.json").read_text())["subsets"]["Natural"]
        cached = json.loads((stages_root / "eval.json").read_text())[str(feat["llmbar"])]["subsets"].get("Natural")
        log["check_export"] = {"eval_rm_natural": exported, "cached_natural": cached}
        if cached:
            print(f"LLMBar Natural: eval-rm on the export {exported['accuracy']:.3f} ({exported['examples']} pairs), "
                  f"from the cache {cached['accuracy']:.3f} ({cached['examples']} pairs)")
    summary_path.write_text(json.dumps(log, indent=2))
    print(f"\nwrote {summary_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
