"""`rmjax score` (bulk implicit-reward / RM scoring) and `rmjax vocab-scan` (exhaustive scoring)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rmjax.commands.options import (
    add_attention_arguments,
    add_strategy_argument,
    attention_options,
)
from rmjax.data.chat import TEMPLATE_CHOICES
from rmjax.errors import RmjaxError

DEFAULT_POLICY, DEFAULT_REFERENCE, HELDOUT = "smollm2-135m-dpo-hh", "smollm2-135m-instruct", "heldout"
RM_DEFAULT_DATA = "llmbar"  # what --rm or --judge alone scores by default (bundled, never trained on)
CROSS_FAMILY = ("smollm2-135m-instruct", "gemma3-270m", "hh-rlhf")
HELDOUT_FILE = "heldout.jsonl.gz"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a corpus with implicit rewards and/or a reward model (resumable)",
                       description="Score every example of a corpus. Re-running the same command resumes it. "
                                   "Default: the implicit RM rmjax ships (SmolLM2-135M-Instruct + its DPO LoRA "
                                   "adapter against SmolLM2-135M-Instruct) on the adapter's held-out HH-RLHF pairs.")
    p.add_argument("--data", default=HELDOUT,
                   help="jsonl / parquet / HF datasets dir, hh-rlhf[:SUBSETS], llmbar[:SUBSETS], or 'heldout': the "
                        "held-out pairs bundled with the --policy adapter (default: %(default)s; with --rm or "
                        f"--judge alone: {RM_DEFAULT_DATA}, RewardBench's LLMBar pairs)")
    p.add_argument("--split", help="split of a DatasetDict directory")
    p.add_argument("--columns", help="column mapping FIELD=COLUMN,... (e.g. prompt=question,chosen=response_a,"
                                     "rejected=response_b)")
    p.add_argument("--ratings", help="flat rating columns read as a single response's ratings, e.g. "
                                     "helpfulness,correctness (HelpSteer2)")
    p.add_argument("--policy", default=None,
                   help=f"policy model (log pi); '' for none (default: {DEFAULT_POLICY}; none with --judge or --rm)")
    p.add_argument("--reference", default=None,
                   help=f"reference model (log pi_ref); '' = reference-free (default: {DEFAULT_REFERENCE} with a "
                        "policy)")
    p.add_argument("--cross-family", action="store_true",
                   help=f"the cross-family pair instead: --policy {CROSS_FAMILY[0]} --reference {CROSS_FAMILY[1]} "
                        f"--data {CROSS_FAMILY[2]} (an instruct model against another family's base model: their "
                        "disagreement, not a reward model)")
    p.add_argument("--rm", default="", help="explicit reward model (*ForSequenceClassification dir)")
    p.add_argument("--judge", default="",
                   help="generative judge: an exported judge dir (rmjax train head.kind=judge, e.g. GRAM) or any "
                        "causal LM as a zero-shot judge; each pair is judged in both orders (swap-debiased). "
                        "Alone, it scores without the default policy/reference")
    p.add_argument("--judge-labels", nargs=2, metavar=("FIRST", "SECOND"),
                   help="verdict tokens for the first / second response (default: the judge's own, else A B)")
    p.add_argument("--judge-template", default="",
                   help="judge prompt: rmjax | gram | a template file with {question} {response_a} {response_b} "
                        "(default: the judge's own, else rmjax)")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--reduction", choices=["sum", "mean"], default="sum",
                   help="sequence log-prob in the implicit reward: sum, or mean (length-normalised)")
    p.add_argument("--template", choices=TEMPLATE_CHOICES, default="model",
                   help="the policy's (and --rm's) rendering: its own chat template (model; raw prompt text for "
                        "a base model) or a fixed one (default: %(default)s)")
    p.add_argument("--reference-template", choices=TEMPLATE_CHOICES, default="model",
                   help="the reference's rendering, as --template (default: %(default)s: a base reference reads "
                        "the raw prompt text)")
    p.add_argument("--sample", type=int, default=None,
                   help="score a fixed, seeded sample of this many examples (0 = the whole corpus; default: every "
                        "held-out pair with --data heldout, else 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per sequence (prompt + response) for each model; see --over-length")
    p.add_argument("--over-length", choices=["truncate", "drop"], default="truncate",
                   help="over-long sequences: truncate (drop the oldest prompt tokens) or drop the example (counted)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="skip")
    p.add_argument("--pack-length", type=int, default=512,
                   help="pack prompt trees (prompt once, its responses as branches) into rows of this many "
                        "tokens; 0 = length-bucketed batches with responses on the prompts' KV cache")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed batch")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch when --pack-length 0")
    p.add_argument("--shard-size", type=int, default=32, help="examples per output part (unit of resumption)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_strategy_argument(p, "both models")
    p.add_argument("--mesh-scope", choices=["process", "global"], default="process",
                   help="with several processes: 'process' (default; models that fit one host) gives each "
                        "process its own shards and a mesh of its own devices; 'global' builds one mesh over "
                        "every process's devices (models sharded across hosts) and scores each shard together")
    p.add_argument("--token-logprobs", action="store_true", help="also store per-token log-probs (tokens.zarr)")
    p.add_argument("--out", default="runs/score", help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_attention_arguments(p)
    p.set_defaults(func=run_score)

    v = sub.add_parser("vocab-scan", help="score every vocabulary token (or every word of a list) as a response",
                       description="Exhaustive scoring over the value prompts; one table per mode.")
    v.add_argument("--model", default="smollm2-135m-instruct", help="model for log-probs; '' with --rm: RM scores only")
    v.add_argument("--reference", default="", help="second model: implicit reward (same tokenizer) or MWLR")
    v.add_argument("--rm", default="", help="reward model (*ForSequenceClassification dir) for RM scores")
    v.add_argument("--prompts", help="YAML {key: prompt}; default the 54 bundled value prompts")
    v.add_argument("--prompt-keys", nargs="*", help="only these prompt keys")
    v.add_argument("--mode", choices=["next-token", "response", "words"], default="next-token")
    v.add_argument("--words", default="big2_nouns",
                   help="words mode: the words to score; next-token mode with --reference: the words whose MWLR "
                        "(mean over case/space variants) goes to mwlr_words.csv. A bundled dictionary name or a file")
    v.add_argument("--template", choices=TEMPLATE_CHOICES, default="model",
                   help="rendering of --model and --rm: the model's chat template (model), for a base model the "
                        "bare prompt (raw, as Christian et al. prompt pretrained models), or a fixed one")
    v.add_argument("--reference-template", choices=TEMPLATE_CHOICES, default="model",
                   help="rendering of --reference, as --template (default: %(default)s)")
    v.add_argument("--mwlr-join", choices=["exact", "folded"], default="exact",
                   help="next-token MWLR across tokenizers: join on exact decoded strings (Christian et al.; "
                        "max per string) or on folded ones (strip + lowercase + ASCII) (default: %(default)s)")
    v.add_argument("--chunk", type=int, default=512, help="responses per batch against the prompt cache")
    v.add_argument("--out", default="runs/vocab_scan")
    add_attention_arguments(v)
    v.set_defaults(func=run_vocab_scan)


def resolve_score_inputs(args) -> None:
    """--cross-family, the default policy / reference (none when only --judge or --rm is given),
    --data heldout (the policy adapter's held-out pairs) and the --sample default."""
    if args.cross_family:
        given = [f for f, v, d in (("--policy", args.policy, None), ("--reference", args.reference, None),
                                   ("--data", args.data, HELDOUT)) if v != d]
        if given:
            raise RmjaxError(f"--cross-family sets the models and data itself; drop {', '.join(given)}")
        args.policy, args.reference, args.data = CROSS_FAMILY
    other = bool(getattr(args, "judge", "") or args.rm)
    if args.policy is None:
        args.policy = "" if other else DEFAULT_POLICY
        if args.reference is None:
            args.reference = "" if other else DEFAULT_REFERENCE
    elif args.reference is None:
        args.reference = DEFAULT_REFERENCE
    if args.data == HELDOUT and not args.policy:  # an RM or a judge alone: RewardBench's LLMBar pairs
        args.data = RM_DEFAULT_DATA
    if args.data == HELDOUT:
        from rmjax.io.registry import resolve_model

        source = resolve_model(args.policy) if args.policy else None
        held = source.path / HELDOUT_FILE if source is not None and source.kind == "adapter" else None
        if held is None or not held.exists():
            raise RmjaxError(f"--data heldout needs a --policy adapter that ships {HELDOUT_FILE} (the pairs it did "
                             f"not train on); {args.policy!r} has none: give --data")
        args.data = str(held)
        args.sample = 0 if args.sample is None else args.sample
    elif args.sample is None:
        args.sample = 64


def run_score(args) -> int:
    import dataclasses
    import time

    import jax
    from tqdm import tqdm

    from rmjax import distributed
    from rmjax.data.records import RecordReport, Share, input_fingerprint
    from rmjax.models.loading import load_model
    from rmjax.scoring import bulk
    from rmjax.scoring.output import ScoreWriter

    distributed.maybe_initialize()
    resolve_score_inputs(args)
    report = RecordReport()
    # each process parses only its part of the input (and owns the shards that start there)
    ratings = tuple(c.strip() for c in args.ratings.split(",") if c.strip()) if args.ratings else ()
    share = distributed.read_share(args.data, on_error=args.on_error, report=report, split=args.split,
                                   sample=args.sample, seed=args.seed, shard_size=args.shard_size,
                                   columns=args.columns, ratings=ratings)
    bulk.log(f"data: {report.summary()}; scoring {share.total} examples"
             + (f" (this process parsed rows {share.units[0]}..{share.units[1] - 1}, holds "
                f"{len(share.records)})" if jax.process_count() > 1 else ""))
    if not share.total:
        raise RmjaxError(f"{args.data}: no records to score")
    s = bulk.ScoreSettings(beta=args.beta, reduction=args.reduction, template=args.template,
                           reference_template=args.reference_template,
                           max_length=args.max_length, over_length=args.over_length, batch_size=args.batch_size,
                           shard_size=args.shard_size, token_logprobs=args.token_logprobs,
                           pack_length=args.pack_length, batch_tokens=args.batch_tokens)
    roles = [("policy", args.policy), ("reference", args.reference), ("rm", args.rm), ("judge", args.judge)]
    if not args.policy and args.reference:
        raise RmjaxError("--reference needs a --policy")
    settings = {"models": {r: m for r, m in roles if m}, "beta": args.beta, "reduction": args.reduction,
                "template": args.template, "reference_template": args.reference_template, "dtype": args.dtype,
                "data": args.data, "split": args.split, "columns": args.columns, "ratings": list(ratings),
                "data_hash": input_fingerprint(args.data), "sample": args.sample, "seed": args.seed,
                "max_length": args.max_length, "over_length": args.over_length, "batch_size": args.batch_size,
                "pack_length": args.pack_length, "batch_tokens": args.batch_tokens,
                "on_error": args.on_error}
    if args.judge:
        settings.update(judge_labels=args.judge_labels, judge_template=args.judge_template)
    def open_writer(overwrite: bool):  # process 0 opens (or resumes) the run before the others
        return ScoreWriter(args.out, settings, num_examples=share.total, shard_size=args.shard_size,
                           token_logprobs=args.token_logprobs, overwrite=overwrite)

    writer = distributed.main_first(lambda first: open_writer(args.overwrite and first))
    if writer.is_complete():
        bulk.log(f"{args.out}: already complete")
        print(json.dumps(writer.metadata.get("summary", {}), indent=2))
        return 0
    mesh = None
    together = args.mesh_scope == "global" and jax.process_count() > 1
    if together and args.strategy == "none":
        raise RmjaxError("--mesh-scope global shards the models over every process's devices: give a --strategy "
                         "(e.g. fsdp)")
    if together:  # every process builds every global batch: each needs all records
        everything = [r for theirs in distributed.exchange("gathering the records", lambda: share.records)
                      for r in theirs]
        share = Share(everything, share.total, 0, share.units, args.shard_size)
    if args.strategy != "none":
        # several processes: each one scores its own shards with the models on its own devices, or
        # (--mesh-scope global) all score every shard on one mesh over all of them
        from rmjax import sharding as shd
        mesh = shd.make_mesh(args.strategy, devices=None if together else distributed.own_devices())
        bulk.log(f"mesh {shd.describe(mesh)} ({args.strategy}) over "
                 f"{'every process' if together else 'this process'}'s devices")
    slots = [bulk.ModelSlot(role, load_model(name, dtype=args.dtype, mesh=mesh,
                                             strategy=args.strategy if mesh else "dp", **attention_options(args)))
             for role, name in roles if name]
    for sl in slots:
        if sl.role == "judge":
            sl.judge = bulk.judge_spec(args.judge, sl.loaded, tuple(args.judge_labels or ()), args.judge_template)
            bulk.log(f"judge: labels {list(sl.judge.labels)} (token ids {list(sl.judge.label_ids)}), chat "
                     f"template {sl.judge.chat}, both candidate orders per pair")
    scorer = bulk.Scorer(slots, s, mesh=mesh, strategy=args.strategy)
    bulk.log(f"models: {', '.join(f'{sl.role}={sl.loaded.source}' for sl in slots)}; "
             f"{'one fused jit for policy+reference' if scorer.fused else 'per-model passes'}"
             + (f", their first {scorer.shared_layers} layers (identical) run once" if scorer.shared_layers else ""))
    pending = writer.pending_shards()
    mine = [k for k in pending if share.owned(k)]
    done = share.total - sum(len(writer.shard_range(k)) for k in pending)
    bar = tqdm(total=share.total, initial=done, unit="ex", desc="score", file=sys.stderr,
               disable=args.no_progress or not distributed.is_main_process())
    t0, tokens = time.perf_counter(), 0
    for k, (rows, dropped, token_streams) in zip(mine, _prefetched_shards(scorer, share, mine)):
        if not together or distributed.is_main_process():  # one global mesh: every process has all rows
            writer.write_shard(k, rows, skipped=dropped, token_logprobs=token_streams if s.token_logprobs else None)
        bar.update(len(writer.shard_range(k)))
        tokens = scorer.real_tokens
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rmjax-score-shards")
    if not distributed.is_main_process():
        return 0
    import pandas as pd
    table = pd.read_parquet(writer.parts_dir)
    summary = bulk.summarise(table.to_dict("records"))
    if scorer.padded_tokens:
        summary["padding_efficiency"] = scorer.real_tokens / scorer.padded_tokens
        summary["tokens_vs_unshared"] = scorer.real_tokens / max(scorer.naive_tokens, 1)
    summary["records_skipped"] = len(report.skipped)
    elapsed = time.perf_counter() - t0  # this invocation (a resumed run counts its own part)
    summary["run"] = {"seconds": round(elapsed, 1), "tokens": int(scorer.real_tokens),
                      "tokens_per_s": round(scorer.real_tokens / max(elapsed, 1e-9), 1)}
    writer.finalize({"summary": summary, "settings_resolved": dataclasses.asdict(s)})
    print(json.dumps(summary, indent=2))
    if "implicit_pairwise_accuracy" in summary and args.reference:
        lo, hi = summary["implicit_pairwise_accuracy_ci95"]
        bulk.log(f"implicit reward {args.policy} vs {args.reference}: pairwise accuracy "
                 f"{summary['implicit_pairwise_accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}] on "
                 f"{summary['implicit_pairs']} pairs of {args.data}")
    if "judge_pairwise_accuracy" in summary:
        lo, hi = summary["judge_pairwise_accuracy_ci95"]
        bulk.log(f"judge {args.judge}: pairwise accuracy {summary['judge_pairwise_accuracy']:.3f} [95% CI {lo:.3f}, "
                 f"{hi:.3f}] on {summary['judge_pairs']} pairs of {args.data} (swap-debiased log-odds; position "
                 f"bias {summary['judge_mean_position_bias']:+.3f})")
    return 0


def _prefetched_shards(scorer, share, shards):
    """Score shards in order; grain prefetches the next shard's records while one is scored."""
    import grain

    ds = grain.MapDataset.source(shards).map(share.shard_records)
    for recs in ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)):
        yield scorer.score_shard(recs)


def run_vocab_scan(args) -> int:
    from rmjax.data.preferences import load_value_prompts
    from rmjax.models.loading import load_model
    from rmjax.scoring import vocab_scan as vs

    prompts = load_value_prompts(Path(args.prompts) if args.prompts else None)
    if args.prompt_keys:
        unknown = [k for k in args.prompt_keys if k not in prompts]
        if unknown:
            raise RmjaxError(f"unknown prompt keys {unknown}; known: {sorted(prompts)[:6]}...")
        prompts = {k: prompts[k] for k in args.prompt_keys}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.model and not (args.rm and args.mode != "next-token"):
        raise RmjaxError("give --model (log-probs), or --rm with --mode response|words for RM scores only")
    attention = attention_options(args)
    model = load_model(args.model, **attention) if args.model else None
    if args.mode == "next-token":
        _next_token_scan(args, model, prompts, out, attention)
        print(f"wrote {out}")
        return 0
    rm = load_model(args.rm, **attention) if args.rm else None
    ref = load_model(args.reference, **attention) if args.reference else None
    from rmjax.scoring.bulk import same_tokenizer
    if ref is not None and model is None:
        raise RmjaxError("--reference needs --model (the implicit reward compares the two)")
    if ref is not None and args.mode == "response" and not same_tokenizer(model.tokenizer, ref.tokenizer):
        raise RmjaxError("--mode response scores token ids, so --reference needs the same tokenizer; use "
                         "--mode next-token (MWLR across tokenizers) or --mode words")
    import pandas as pd
    columns: dict[str, dict[str, list]] = {}
    words = _words(args.words) if args.mode == "words" else None
    for key, text in prompts.items():
        for tag, loaded in (("policy", model), ("reference", ref), ("rm", rm)):
            if loaded is None:
                continue
            template = args.reference_template if tag == "reference" else args.template
            base = "plain" if tag == "rm" else "raw"  # an RM without a template reads what it trained on
            if words is None:
                prompt_ids, cands = vs.token_responses(loaded, text, template, base)
            else:
                prompt_ids, cands = vs.word_responses(loaded, text, words, template, base)
            gate = vs.prompt_gate(loaded, text, template, base) if tag == "rm" else 0
            res = vs.scan_responses(loaded, prompt_ids, cands, chunk=args.chunk, rm=tag == "rm", gate=gate,
                                    progress=f"{key} [{tag}]")
            columns.setdefault(tag, {})[key] = res["rm"] if tag == "rm" else res["sum"]
    first = model or rm
    labels = words if words is not None else [first.tokenizer.token_to_str(i) for i in range(len(cands))]
    tables = {tag: pd.DataFrame({"response": labels, **cols}) for tag, cols in columns.items()}
    if ref is not None:
        tables["implicit_reward"] = pd.DataFrame({"response": labels, **{
            k: columns["policy"][k] - columns["reference"][k] for k in prompts}})
    for tag, frame in tables.items():
        name = f"{args.mode}_{tag}"
        if words is None:  # token ids: rows in the analysis schema, the ids in token_ids/
            frame = frame.rename_axis("token_id")
            frame = frame[frame["response"] != ""]
            (out / "token_ids").mkdir(exist_ok=True)
            _write_csv(frame[["response"]].reset_index(), out / "token_ids" / f"{name}.csv")
        _write_csv(frame, out / f"{name}.csv")
    print(f"wrote {out}")
    return 0


def _next_token_scan(args, model, prompts: dict, out: Path, attention: dict) -> None:
    """Next-token tables in the analysis schema (``response`` + one column per prompt key; the token
    ids of each row in token_ids/); with a reference also the log-ratio implicit reward and MWLR."""
    from rmjax.models.loading import load_model
    from rmjax.scoring import vocab_scan as vs
    from rmjax.scoring.bulk import same_tokenizer

    def write_table(table, name: str) -> None:
        _write_csv(table, out / f"{name}.csv")
        (out / "token_ids").mkdir(exist_ok=True)
        _write_csv(table[["response"]].reset_index(), out / "token_ids" / f"{name}.csv")

    table = vs.next_token_table(model, prompts, args.template)
    write_table(table, "next_token_logprobs")
    if not args.reference:
        return
    ref = load_model(args.reference, **attention)
    ref_table = vs.next_token_table(ref, prompts, args.reference_template)
    write_table(ref_table, "reference_next_token_logprobs")
    shared = same_tokenizer(model.tokenizer, ref.tokenizer)
    ratio = vs.log_ratio_table(table, ref_table, prompts, shared)
    if shared:
        write_table(ratio, "next_token_implicit_reward")
    else:  # one row per exact decoded string both vocabularies hold
        _write_csv(ratio, out / "next_token_implicit_reward.csv")
    mwlr = vs.mwlr_table(table, ref_table, prompts, args.mwlr_join)
    _write_csv(mwlr, out / "mwlr.csv")
    words = vs.word_mwlr(mwlr, _words(args.words))
    _write_csv(words.drop(columns="variants").rename(columns={"word": "response"}), out / "mwlr_words.csv")


def _write_csv(frame, path: Path) -> None:
    # Vocabulary tokens include "\r", "\x0b" and the like: quote every text field so that each
    # token stays one row when the table is read back.
    import csv

    frame.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC)


def _words(spec: str) -> list[str]:
    from rmjax.analysis import load_dictionary

    return list(load_dictionary(spec).words)
