"""`rmjax train --config FILE.yaml [dotted.key=value ...]` and `rmjax eval-rm`."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a Bradley-Terry reward model (resumable)",
                       description="Train a reward model. Re-running the same command resumes it.")
    p.add_argument("--config", help="YAML config (see experiments/rm_ablation/base.yaml); defaults apply otherwise")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-5 data.source=harmless")
    p.add_argument("--overwrite", action="store_true", help="delete a run_dir holding different settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval-rm", help="RewardBench-style held-out report on the bundled LLMBar pairs",
                       description="Pairwise accuracy of a reward model on LLMBar's five subsets.")
    e.add_argument("--model", required=True,
                   help="a trained run's final/ dir, a HF *ForSequenceClassification dir, or a registry name")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-length", type=int, default=1024)
    e.add_argument("--out", help="write the report as JSON here")
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    from rmjax.train.config import load_config
    from rmjax.train.loop import train

    config = load_config(args.config, args.overrides)
    result = train(config, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def run_eval(args) -> int:
    from rmjax.train.evaluate import evaluate_llmbar

    report = evaluate_llmbar(args.model, batch_size=args.batch_size, max_length=args.max_length)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
