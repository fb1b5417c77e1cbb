"""`rmjax armorm STAGE`: ArmoRM's stages on feature caches (`rmjax features`), one command each; flags
mapped onto the stage's config in ``rmjax.jobs.armorm``.

    rmjax armorm regression --cache C --out S1 [--pair-objective SUBSET=OBJ ...] [--pair-loss ridge|bt]
                            [--verbosity NAME] [--range OBJ=LO:HI ...]
    rmjax armorm debias     --stage1 S1 --reference C --out DB [--verbosity NAME] [--threshold 0.03]
    rmjax armorm gate       --stage1 S1 [--debias DB] --pairs C --out S2 [--steps ...]
    rmjax armorm evaluate   --stage1 S1 [--debias DB] --gate S2 --cache C [C ...] [--out R.json]
    rmjax armorm export     --stage1 S1 [--debias DB] --gate S2 --model M --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rmjax.commands.options import (
    Flag,
    add_config_arguments,
    config_from_args,
    no_progress,
)
from rmjax.jobs import armorm as jobs
from rmjax.train.armorm import GateSettings

STAGES = {"--stage1": "stages.stage1", "--debias": "stages.debias", "--gate": "stages.gate"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("armorm", help="ArmoRM's stages on feature caches (regression, debias, gate, evaluate, export)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", required=True)

    r = stages.add_parser("regression", help="stage 1: per-objective ridge, penalty chosen on held-out rows")
    add_config_arguments(r, jobs.RegressionConfig, {
        "--cache": "cache", "--out": "out",
        "--pair-objective": Flag("pair_objectives", action="append", metavar="SUBSET=OBJECTIVE"),
        "--pair-loss": "pair_loss", "--verbosity": "verbosity",
        "--range": Flag("ranges", action="append", metavar="OBJECTIVE=LOW:HIGH"),
        "--grid": Flag("grid", nargs="+"), "--val-fraction": "val_fraction", "--seed": "seed"})
    r.set_defaults(func=run_regression)

    d = stages.add_parser("debias", help="the authors' verbosity penalty search -> reward transform matrix")
    add_config_arguments(d, jobs.DebiasConfig, {"--stage1": "stage1", "--reference": "reference", "--out": "out",
                                                "--verbosity": "verbosity", "--threshold": "threshold"})
    d.set_defaults(func=run_debias)

    g = stages.add_parser("gate", help="stage 2: the gating MLP trained with BT on cached preference pairs")
    flags = {"--stage1": "stage1", "--debias": "debias", "--pairs": "pairs", "--out": "out",
             "--no-progress": no_progress("no training log")}
    flags.update({f"--{f.name.replace('_', '-')}": f"settings.{f.name}" for f in dataclasses.fields(GateSettings)})
    add_config_arguments(g, jobs.GateConfig, flags)
    g.set_defaults(func=run_gate)

    e = stages.add_parser("evaluate", help="accuracy per subset (95% intervals) from feature caches")
    add_config_arguments(e, jobs.EvaluateConfig, {**STAGES, "--cache": Flag("caches", nargs="+"), "--out": "out"})
    e.set_defaults(func=run_evaluate)

    x = stages.add_parser("export", help="an HF directory in the released ArmoRM layout")
    add_config_arguments(x, jobs.ExportConfig, {**STAGES, "--model": "model", "--out": "out"})
    x.set_defaults(func=run_export)


def run_regression(args) -> int:
    rec = jobs.regression(config_from_args(args.job, args))
    print(json.dumps({k: rec[k] for k in ("objectives", "rows", "rated", "per_objective")}, indent=2))
    return 0


def run_debias(args) -> int:
    rec = jobs.debias(config_from_args(args.job, args))
    print(json.dumps(rec["per_objective"], indent=2))
    return 0


def run_gate(args) -> int:
    rec = jobs.gate(config_from_args(args.job, args), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({k: rec[k] for k in ("pairs_train", "pairs_val", "train_accuracy", "val_accuracy")}, indent=2))
    return 0


def run_evaluate(args) -> int:
    reports = jobs.evaluate(config_from_args(args.job, args))
    for cache, rep in reports.items():
        lo, hi = rep["ci95"]
        print(f"{cache}: accuracy {rep['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {rep['examples']} examples")
        for name, g in rep["subsets"].items():
            print(f"  {name}: {g['accuracy']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] ({g['examples']})")
    return 0


def run_export(args) -> int:
    out = jobs.export(config_from_args(args.job, args))
    print(f"wrote {out} (LlamaForRewardModelWithGating layout; rmjax eval-rm --model {out})")
    return 0
