"""ArmoRM end to end: feature caches, stage-1 regression, verbosity debiasing, stage-2 gate,
evaluation and export, each stage one `rmjax` command (printed before it runs).

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
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from rmjax.cli import main as rmjax_main
from rmjax.data.records import read_records

STAGES = ("data", "features", "regression", "debias", "gate", "evaluate", "export")


def command(argv: list[str], log: dict, name: str) -> float:
    print(f"\n$ rmjax {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = rmjax_main(argv)
    if code:
        raise SystemExit(f"stage {name} failed (exit {code})")
    seconds = time.perf_counter() - t0
    log.setdefault("commands", {})[name] = {"argv": ["rmjax", *argv], "seconds": round(seconds, 1)}
    return seconds


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
            done = (path / "metadata.json").exists() and json.loads((path / "metadata.json").read_text())["status"] == "complete"
            argv = ["features", "--model", model, "--data", data[name], "--out", str(path),
                    *[x for k, v in f.items() for x in (f"--{k.replace('_', '-')}", str(v))], "--no-progress"]
            if done:
                print(f"\n{path}: complete (rmjax {shlex.join(argv)})")
                continue
            command(argv, log, f"features:{name}")
            if not done:
                meta = json.loads((path / "metadata.json").read_text())
                log.setdefault("features", {})[name] = {"counts": meta["counts"], "throughput": meta["throughput"]}
    if "regression" in todo:
        r = cfg["regression"]
        command(["armorm", "regression", "--cache", str(feat["stage1"]), "--out", str(stage1),
                 *[x for subset in cfg["splits"]["objectives"] for x in ("--pair-objective", f"{subset}={subset}")],
                 "--verbosity", r["verbosity"], "--pair-loss", r.get("pair_loss", "ridge")], log, "regression")
    if "debias" in todo:
        command(["armorm", "debias", "--stage1", str(stage1), "--reference", str(feat["stage2"]), "--out", str(debias),
                 "--verbosity", cfg["regression"]["verbosity"], "--threshold", str(cfg["debias"]["threshold"])],
                log, "debias")
    if "gate" in todo:
        command(["armorm", "gate", "--stage1", str(stage1), "--debias", str(debias), "--pairs", str(feat["stage2"]),
                 "--out", str(gate), *[x for k, v in cfg["gate"].items() for x in (f"--{k.replace('_', '-')}", str(v))]],
                log, "gate")
    stages = ["--stage1", str(stage1), "--debias", str(debias), "--gate", str(gate)]
    if "evaluate" in todo:
        command(["armorm", "evaluate", *stages, "--cache", str(feat["heldout"]), str(feat["llmbar"]),
                 "--out", str(stages_root / "eval.json")], log, "evaluate")
    if "export" in todo:
        command(["armorm", "export", *stages, "--model", model, "--out", str(final)], log, "export")
    if args.check_export:
        command(["eval-rm", "--model", str(final), "--data", "llmbar:Natural",
                 "--max-length", str(cfg["features_llmbar"]["max_length"]), "--out", str(stages_root / "eval_rm_natural.json")],
                log, "check-export")
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
