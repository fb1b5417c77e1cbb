"""Training and evaluation examples: records (``read_records``) -> prompt trees with labels, per head.

    load_sets(run, tokenizer)   data.train / data.eval (or a held-out part of data.train) as ExampleSets
    build(records, ...)         one ExampleSet for a head's tree kind ("pairs", "ratings", "judge", "lm")

An Example is one tree (``rmjax.data.batching.Encoded``: the prompt once, then its responses) and
its labels: ``pairs`` (winner, loser) response indices for pairwise losses, ``targets`` (K ratings,
None = not rated) for regression, ``labels`` (the correct verdict per response) for the judge;
an "lm" tree (GRAM pair pretraining) is the question and one reply holding both answers.
Records that cannot become an example of this kind are dropped and counted, each with its reason.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from rmjax.data import batching, judge_prompts
from rmjax.data.chat import render
from rmjax.data.records import Record, RecordReport, rating_matrix, read_records
from rmjax.errors import DataError
from rmjax.heads.reward import pooled_response


@dataclasses.dataclass(frozen=True)
class Example:
    tree: batching.Encoded
    record: Record
    pairs: tuple[tuple[int, int], ...] = ()
    targets: tuple | None = None
    labels: tuple[int, ...] = ()

    @property
    def margin(self) -> float:
        return self.record.margin or 0.0

    @property
    def weight(self) -> float:
        return 1.0 if self.record.weight is None else self.record.weight


@dataclasses.dataclass
class ExampleSet:
    examples: list[Example]
    dropped: list[str] = dataclasses.field(default_factory=list)  # "id: reason"
    truncated: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # bad records (place: error)
    objectives: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        s = f"{len(self)} examples, {self.truncated} truncated, {len(self.dropped)} dropped"
        if self.dropped:
            s += f" (first: {self.dropped[0]})"
        if self.skipped:
            s += f", {len(self.skipped)} bad records skipped (first: {self.skipped[0]})"
        return s


def _pairs_example(tokenizer, rec: Record, run) -> Example | str:
    if rec.kind not in ("pair", "best_of_n"):
        return f"{rec.id}: a single response has nothing to be compared with; give pairs or best-of-N records"
    k = rec.correct
    if set(rec.responses[:k]) & set(rec.responses[k:]):
        return f"{rec.id}: chosen and rejected are identical"
    d = run.data
    enc = batching.encode(tokenizer, rec, d.template, d.max_length, d.over_length, gate=run.head.kind == "armorm")
    if isinstance(enc, str):
        return enc
    # every correct response against every rejected one
    return Example(pooled(enc, tokenizer, run), rec,
                   pairs=tuple((i, j) for i in range(k) for j in range(k, len(rec.responses))))


def pooled(enc: batching.Encoded, tokenizer, run) -> batching.Encoded:
    """A reward head reads where transformers' classifier will read the export (the last token that is
    not the pad id the export writes, ``tokenizer.pad_id``): trailing pad-id tokens are left out.
    Language-model heads (log-probs, verdicts) keep every token."""
    if run.head.kind not in ("scalar", "multi_objective", "armorm"):
        return enc
    return dataclasses.replace(enc, responses=tuple(pooled_response(r, tokenizer.pad_id) for r in enc.responses))


def _judge_example(tokenizer, rec: Record, run) -> Example | str:
    if rec.kind != "pair":
        return f"{rec.id}: the judge compares two responses; give pair records"
    if rec.responses[0] == rec.responses[1]:
        return f"{rec.id}: chosen and rejected are identical"
    d = run.data
    seqs = judge_prompts.judge_sequences(tokenizer, rec, run.head.judge_labels, d.template,
                                 judge_prompts.judge_template(run.head.judge_template))
    enc = batching.encode_sequences(seqs, 2 * d.max_length, d.over_length)  # the prompt holds both responses
    if isinstance(enc, str):
        return f"{rec.id}: {enc}"
    return Example(enc, rec, labels=(0, 1))  # chosen first: the first label wins; then the second


def _lm_pairs_example(tokenizer, rec: Record, run) -> Example | str:
    """GRAM stage 1: the question, then both answers as one reply (the LM loss trains on the reply);
    the order of the two answers is random per record, so it carries no preference."""
    if rec.kind != "pair":
        return f"{rec.id}: pair pretraining writes out two answers; give pair records"
    swap = bool(np.random.default_rng([run.data.shuffle_seed, rec.index]).integers(2))
    prompt, text = judge_prompts.pair_text(rec, swap)
    d = run.data
    p, r = render(tokenizer, prompt, text, d.template)
    kept = batching.truncate(p, [r], 2 * d.max_length, d.over_length)  # the reply holds both answers
    if isinstance(kept, str):
        return f"{rec.id}: {kept}"
    enc = batching.Encoded(np.asarray(kept[0], np.int32), (np.asarray(r, np.int32),), kept[1])
    return Example(enc, rec)


def build(records: list[Record], tokenizer, run, trees: str, objectives: tuple[str, ...] = ()) -> ExampleSet:
    """The examples of one head's tree kind; dropped records are counted with their reasons."""
    out = ExampleSet([])
    if trees == "ratings":
        rated = [r for r in records if r.kind == "single"]
        out.dropped += [f"{r.id}: a pair has no absolute ratings; give {{prompt, response, ratings}} records"
                        for r in records if r.kind != "single"]
        out.objectives, values = rating_matrix(rated, objectives)
        for rec, v in zip(rated, values):
            d = run.data
            enc = batching.encode(tokenizer, rec, d.template, d.max_length, d.over_length)
            if isinstance(enc, str):
                out.dropped.append(enc)
                continue
            out.examples.append(Example(pooled(enc, tokenizer, run), rec, targets=tuple(v)))
            out.truncated += enc.truncated
        return out
    make = {"pairs": _pairs_example, "judge": _judge_example, "lm": _lm_pairs_example}[trees]
    for rec in records:
        ex = make(tokenizer, rec, run)
        if isinstance(ex, str):
            out.dropped.append(ex)
            continue
        out.examples.append(ex)
        out.truncated += ex.tree.truncated
    return out


def read_inputs(inputs: tuple[str, ...], on_error: str, report: RecordReport, **options) -> list[Record]:
    """The records of every input, indexed in order (``options``: ``read_records``'s column mapping,
    rating columns, split)."""
    records: list[Record] = []
    for source in inputs:
        for r in read_records(source, on_error=on_error, report=report, **options):
            records.append(dataclasses.replace(r, index=len(records)))
    return records


def _key(r: Record) -> tuple:
    return r.prompt, r.responses


def split_holdout(records: list[Record], run) -> tuple[list[Record], list[Record]]:
    """Deterministic held-out eval records, then the first ``fraction`` of the rest (nested subsets)."""
    d = run.data
    order = np.random.default_rng(d.shuffle_seed).permutation(len(records))
    shuffled = [records[i] for i in order]
    n_eval = int(d.holdout) if d.holdout >= 1 else int(round(d.holdout * len(records)))
    evals, pool = shuffled[:n_eval], shuffled[n_eval:]
    return pool[:max(1, math.ceil(d.fraction * len(pool)))], evals


def load_sets(run, tokenizer, trees: str, log=None) -> tuple[ExampleSet, ExampleSet]:
    """(train, eval) example sets of ``run.data``; an eval set overlapping training is warned about."""
    log = log or (lambda m: print(m, file=sys.stderr))
    d = run.data
    train_report, eval_report = RecordReport(), RecordReport()
    options = d.read_options()
    records = read_inputs(d.train, d.on_error, train_report, **options)
    if d.eval:
        evals = read_inputs(d.eval, d.on_error, eval_report, **options)
        order = np.random.default_rng(d.shuffle_seed).permutation(len(records))
        pool = [records[i] for i in order]
        train_records = pool[:max(1, math.ceil(d.fraction * len(pool)))]
        held = {_key(r) for r in evals}
        overlap = sum(_key(r) in held for r in train_records)
        if overlap:
            log(f"warning: {overlap} of {len(train_records)} training examples also appear in the eval set "
                f"({', '.join(d.eval)}); eval accuracy on them is not held-out")
    else:
        train_records, evals = split_holdout(records, run)
    if not train_records:
        raise DataError(f"no training records in {list(d.train)} ({train_report.summary()})")
    train = build(train_records, tokenizer, run, trees, tuple(run.head.objectives))
    held_out = build(evals, tokenizer, run, trees, train.objectives or tuple(run.head.objectives))
    train.skipped, held_out.skipped = train_report.skipped, eval_report.skipped
    if not train.examples:
        raise DataError(f"none of the {len(train_records)} training records makes a {trees} example "
                        f"(first reason: {train.dropped[0] if train.dropped else 'none'})")
    if trees == "ratings":
        check_objectives(train, f"data.train {list(d.train)}")
    return train, held_out


def check_objectives(examples: ExampleSet, where: str) -> None:
    """Every objective is rated by at least one example (an unrated objective would train nothing)."""
    for k, name in enumerate(examples.objectives):
        if all(e.targets[k] is None for e in examples.examples):
            raise DataError(f"{where}: objective {name!r} has no data: none of the {len(examples)} training examples "
                            f"rates it (field 'ratings.{name}' is null everywhere); rate some responses, or remove "
                            "the objective from the records' ratings (and head.objectives)")
