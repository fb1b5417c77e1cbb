"""`rmjax train --config FILE.yaml [dotted.key=value ...]`, `rmjax eval-rm` and `rmjax merge-adapter`."""
from __future__ import annotations

import argparse
import json

from rmjax.commands.options import add_attention_arguments, attention_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a reward model: any head x loss on any preference data (resumable)",
                       description="Train a reward model. Re-running the same command resumes it.")
    p.add_argument("--config", help="YAML config (see experiments/rm_ablation/base.yaml); defaults apply otherwise")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-5 data.train=hh-rlhf:harmless")
    p.add_argument("--overwrite", action="store_true", help="delete a run_dir holding different settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval-rm", help="a reward model on any dataset, or on RewardBench 1 / 2 as their "
                                       "leaderboards score them",
                       description="Accuracy per subset (95% CI) of an explicit or implicit reward model on pairs "
                                   "and best-of-N records; MSE per objective on ratings; with --benchmark, "
                                   "RewardBench 1 or 2 by the leaderboard's rules. Default data: LLMBar.")
    e.add_argument("--model", default="", help="a reward model: HF *ForSequenceClassification dir (incl. ArmoRM, "
                                               "URM, QRM), an exported run (final/), BASE+ADAPTER_DIR, an adapter dir")
    e.add_argument("--data", nargs="+", default=["llmbar"],
                   help="jsonl / parquet / datasets dirs, hh-rlhf[:SUBSETS], llmbar[:SUBSETS] (default llmbar)")
    e.add_argument("--split", help="split of a DatasetDict directory")
    e.add_argument("--benchmark", choices=sorted(benchmarks_available()), default="generic",
                   help="generic (any data: ties share), rewardbench (RB1: strict wins, 4 sections weighted as the "
                        "leaderboard, score = their mean) or rewardbench2 (RB2: best-of-N, the Ties formula, score = "
                        "the mean of the 6 subsets); give the published file as --data (default: %(default)s)")
    e.add_argument("--columns", help="column mapping FIELD=COLUMN,... for any input (e.g. "
                                     "prompt=question,chosen=response_a,rejected=response_b)")
    e.add_argument("--ratings", help="flat rating columns read as the ratings of a single response, e.g. "
                                     "helpfulness,correctness,coherence,complexity,verbosity (HelpSteer2)")
    e.add_argument("--policy", default="", help="implicit reward: the policy model (instead of --model)")
    e.add_argument("--reference", default="", help="implicit reward: the reference model ('' = reference-free)")
    e.add_argument("--beta", type=float, default=1.0)
    e.add_argument("--reduction", choices=["sum", "mean"], default="sum", help="implicit reward: sequence log-prob")
    e.add_argument("--categories", help="YAML/JSON {category: [subset, ...]}: an example-weighted roll-up (generic)")
    e.add_argument("--objective", help="multi-objective RM: rank by this objective (default their mean)")
    e.add_argument("--batch-size", type=int, default=8, help="packed rows (or prompts, --pack-length 0) per batch")
    e.add_argument("--max-length", type=int, default=2048,
                   help="tokens per sequence; longer ones lose their oldest prompt tokens and are counted "
                        "(default: %(default)s)")
    e.add_argument("--pack-length", type=int, default=1024,
                   help="pack prompt trees into rows of this many tokens; 0: each prompt once on its KV cache, "
                        "its responses batched after it (default: %(default)s)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    e.add_argument("--template", default="model", help="chat rendering (model, plain, chatml, gemma, llama3)")
    e.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    e.add_argument("--out", help="write the report as JSON here (markdown next to it, .md; every example's "
                                 "rewards, .rewards.jsonl)")
    add_attention_arguments(e)
    e.set_defaults(func=run_eval)

    m = sub.add_parser("merge-adapter", help="write a LoRA adapter merged into its base as a full HF checkpoint")
    m.add_argument("--model", required=True, help="BASE+ADAPTER_DIR or an adapter dir naming its base")
    m.add_argument("--out", required=True)
    m.set_defaults(func=run_merge)


def run_train(args) -> int:
    from rmjax.train.config import load_config
    from rmjax.train.loop import train

    config = load_config(args.config, args.overrides)
    result = train(config, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def benchmarks_available() -> list[str]:
    from rmjax.benchmarks import BENCHMARKS
    return list(BENCHMARKS)


def run_eval(args) -> int:
    from rmjax.benchmarks import markdown
    from rmjax.train.rm_eval import evaluate_rm, write_report

    ratings = tuple(c.strip() for c in args.ratings.split(",") if c.strip()) if args.ratings else ()
    report = evaluate_rm(args.model, data=tuple(args.data), policy=args.policy, reference=args.reference,
                         beta=args.beta, reduction=args.reduction, benchmark=args.benchmark,
                         categories=args.categories, max_length=args.max_length, batch_size=args.batch_size,
                         pack_length=args.pack_length, template=args.template, on_error=args.on_error,
                         objective=args.objective, dtype=args.dtype, columns=args.columns, ratings=ratings,
                         split=args.split, attention=attention_options(args))
    print(markdown(report))
    if args.out:
        for path in write_report(report, args.out):
            print(f"wrote {path}")
    return 0


def run_merge(args) -> int:
    from rmjax.io.adapters import merge

    print(f"wrote {merge(args.model, args.out)}")
    return 0
