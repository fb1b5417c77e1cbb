"""`rmjax features`: a frozen backbone's features over a corpus, cached in zarr (ArmoRM stage 0)."""
from __future__ import annotations

import argparse
import json
import sys

from rmjax.commands.options import (
    add_attention_arguments,
    add_strategy_argument,
    attention_options,
)
from rmjax.data.chat import TEMPLATE_CHOICES
from rmjax.errors import RmjaxError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="cache a frozen model's hidden states over a corpus (resumable)",
                       description="Per example: the final-normed hidden state at each response's last token "
                                   "and at the gating token (the token that closes the user turn), response "
                                   "lengths and ratings, in OUT/features.zarr + OUT/examples.parquet. "
                                   "Re-running the same command resumes it.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF dir or .gguf")
    p.add_argument("--data", required=True, help="jsonl / parquet / HF datasets dir, hh-rlhf[:SUBSETS], llmbar")
    p.add_argument("--split", help="split of a DatasetDict directory")
    p.add_argument("--sample", type=int, default=0, help="a fixed, seeded sample of this many records (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=TEMPLATE_CHOICES, default="model")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (prompt + response)")
    p.add_argument("--over-length", choices=["truncate", "drop"], default="truncate")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    p.add_argument("--pack-length", type=int, default=1024, help="packed row length in tokens")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed batch")
    p.add_argument("--shard-size", type=int, default=64, help="examples per part (unit of resumption)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_strategy_argument(p, "the model and batches")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_attention_arguments(p)
    p.set_defaults(func=run_features)


def run_features(args) -> int:
    from rmjax import distributed
    from rmjax.data.records import RecordReport, input_fingerprint
    from rmjax.io import registry
    from rmjax.models.loading import load_model
    from rmjax.scoring import features

    distributed.maybe_initialize()
    report = RecordReport()
    # each process parses only its part of the input (and owns the shards that start there)
    records = distributed.read_share(args.data, on_error=args.on_error, report=report, split=args.split,
                                     sample=args.sample, seed=args.seed, shard_size=args.shard_size)
    print(f"data: {report.summary()}; caching {records.total} examples", file=sys.stderr)
    if not records.total:
        raise RmjaxError(f"{args.data}: no records to cache")
    mesh = None
    if args.strategy != "none":  # several processes: each caches its own shards on its own devices
        from rmjax import sharding as shd
        mesh = shd.make_mesh(args.strategy, devices=distributed.own_devices())
    loaded = load_model(args.model, dtype=args.dtype, mesh=mesh, strategy=args.strategy if mesh else "dp",
                        **attention_options(args))
    settings = features.FeatureSettings(template=args.template, max_length=args.max_length,
                                        over_length=args.over_length, shard_size=args.shard_size,
                                        pack_length=args.pack_length, batch_tokens=args.batch_tokens)
    provenance = {"model": args.model, "model_source": str(registry.resolve_model(args.model).path),
                  "data": args.data, "split": args.split, "data_hash": input_fingerprint(args.data),
                  "sample": args.sample, "seed": args.seed, "on_error": args.on_error,
                  "records_skipped": len(report.skipped)}

    def progress(done: int, total: int, tok_s: float) -> None:
        if not args.no_progress:
            print(f"features: {done}/{total} examples | {tok_s:.0f} tok/s", file=sys.stderr, flush=True)

    meta = features.cache_features(records, loaded, args.out, settings=settings, provenance=provenance,
                                   dtype=args.dtype, mesh=mesh, strategy=args.strategy if mesh else "dp",
                                   overwrite=args.overwrite, progress=progress)
    print(json.dumps({"out": args.out, "counts": meta.get("counts"), "throughput": meta.get("throughput")}, indent=2))
    return 0
