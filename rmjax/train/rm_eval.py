"""``rmjax eval-rm``: any reward model on any dataset, and RewardBench 1 / 2 as their leaderboards score them.

    evaluate_rm(model=..., data=("llmbar",))                 an explicit RM: any reward head rmjax reads
                                                             (``rmjax.heads.reward``: *ForSequenceClassification,
                                                             ArmoRM, URM, QRM, rmjax exports, BASE+ADAPTER), an
                                                             exported judge, or an exported DPO policy
    evaluate_rm(policy=P, reference=R, beta=, reduction=)    the implicit reward beta * (log pi - log pi_ref)
    evaluate_rm(policy=P, reference="")                      reference-free: beta * log pi (sum or mean)
    evaluate_rm(..., benchmark="rewardbench2", data=(FILE,)) the leaderboard's rules (``rmjax.benchmarks``)

The rewards come from the bulk scoring engine ``rmjax score`` uses (``rmjax.scoring.bulk.Scorer``:
packed prompt trees, or the prompt's KV cache with ``pack_length=0``), so every head is computed one
way and neither the batch size nor the layout changes a reward. Pairs and best-of-N records are
scored by the benchmark's rule; rating records ({prompt, response, ratings}) of a multi-objective
head give the MSE per objective. Every example's rewards are returned (``per_example``) and written
beside the report, so anyone can recompute the numbers.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from rmjax import benchmarks
from rmjax.data.records import RecordReport
from rmjax.errors import ConfigError, DataError, RmjaxError


def _load(name: str, dtype: str, attention: dict):
    from rmjax.models.loading import load_model
    return load_model(name, dtype=dtype, **attention)


def model_slots(model: str = "", *, policy: str = "", reference: str = "", beta: float = 1.0,
                objective: str | None = None, dtype: str = "float32", attention: dict | None = None):
    """(the scoring slots, the head kind, beta, a name) of an explicit or implicit reward model."""
    from rmjax.heads.reward import export_settings, with_objective
    from rmjax.scoring.bulk import ModelSlot, judge_spec, same_tokenizer

    if bool(model) == bool(policy):
        raise ConfigError("give --model (a reward model) or --policy (the implicit reward), not both")
    attention = attention or {}
    loaded = _load(model or policy, dtype, attention)
    if model and loaded.reward_head is not None:
        head = with_objective(loaded.reward_head, objective)
        return [ModelSlot("rm", loaded, reward=head)], head.spec.kind, beta, model
    settings = export_settings(Path(model)) if model and Path(model).is_dir() else {}
    if model and settings.get("kind") == "judge":
        return [ModelSlot("judge", loaded, judge=judge_spec(model, loaded))], "judge", beta, model
    if model and "beta" not in settings:
        raise ConfigError(f"{model}: a language model, not a reward model (no reward head); evaluate its implicit "
                          "reward with --policy MODEL --reference REF")
    ref_name = reference if policy else settings.get("reference", "")
    beta = beta if policy else settings.get("beta", beta)
    slots = [ModelSlot("policy", loaded)]
    if ref_name:
        ref = _load(ref_name, dtype, attention)
        if not same_tokenizer(ref.tokenizer, loaded.tokenizer):
            raise ConfigError(f"--reference {ref_name} has another tokenizer than the policy; the implicit reward "
                              "compares log-probs of the same token ids")
        slots.append(ModelSlot("reference", ref))
    name = model or f"implicit: {policy} vs {reference or '(reference-free)'}"
    return slots, "lm", beta, name


def _scores(row: dict, names: tuple[str, ...], kind: str) -> np.ndarray:
    """One reward per response of a scored row (a judge: its swap-debiased margin against 0)."""
    if kind == "judge":
        return np.array([row["judge_margin"], 0.0])
    prefix = "reward_" if kind == "lm" else "rm_"
    return np.array([row[f"{prefix}{n}"] for n in names], np.float64)


def evaluate_rm(model: str = "", *, data: tuple[str, ...] = ("llmbar",), policy: str = "", reference: str = "",
                beta: float = 1.0, reduction: str = "sum", benchmark: str = "generic", categories: str | None = None,
                max_length: int = 1024, batch_size: int = 8, pack_length: int = 512, template: str = "model",
                on_error: str = "skip", objective: str | None = None, dtype: str = "float32",
                columns: str | dict | None = None, ratings: tuple[str, ...] = (), split: str | None = None,
                attention: dict | None = None, log=None) -> dict:
    """The report dict (``rmjax.benchmarks``), with the rewards of every example under ``per_example``.
    ``pack_length`` > 0 packs prompt trees into rows of that many tokens (``batch_size`` rows per
    batch), 0 scores ``batch_size`` prompts per batch on their KV cache."""
    from rmjax.scoring.bulk import ScoreSettings, Scorer
    from rmjax.train.examples import read_inputs

    log = log or (lambda m: print(m, file=sys.stderr))
    if benchmark not in benchmarks.BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; one of {list(benchmarks.BENCHMARKS)}")
    if categories and benchmark != "generic":
        raise ConfigError(f"--categories rolls subsets up for any data; {benchmark} has its own sections")
    slots, kind, beta, name = model_slots(model, policy=policy, reference=reference, beta=beta, objective=objective,
                                          dtype=dtype, attention=attention)
    report_in = RecordReport()
    records = read_inputs(tuple(data), on_error, report_in, columns=columns, ratings=ratings, split=split)
    subsets = [r.subset for r in records]
    if any(subsets) and not all(subsets):
        first = next(r for r in records if not r.subset)
        raise DataError(f"{first.place}: this record has no subset but {sum(map(bool, subsets))} other evaluation "
                        "records have one; give every record a subset (or none)")
    rated = bool(records) and all(r.ratings is not None for r in records)
    dropped = []
    if rated:
        spec = slots[0].reward.spec if kind not in ("lm", "judge") else None
        if spec is None or spec.num_objectives < 2:
            raise DataError(f"{list(data)}: rating records are evaluated against a multi-objective reward head's "
                            f"objectives; {name} is a {kind} model")
    else:
        keep = []
        for r in records:
            if r.kind == "single":
                dropped.append(f"{r.id}: a single response has nothing to be compared with; give pairs, best-of-N "
                               "or rating records")
            elif set(r.responses[:r.correct]) & set(r.responses[r.correct:]):
                dropped.append(f"{r.id}: chosen and rejected are identical")
            else:
                keep.append(r)
        records = [dataclasses.replace(r, index=i) for i, r in enumerate(keep)]
    if not records:
        raise RmjaxError(f"{list(data)}: no example to evaluate ({dropped[0] if dropped else 'no records'})")
    settings = ScoreSettings(beta=beta, reduction=reduction, template=template, max_length=max_length,
                             batch_size=batch_size, pack_length=pack_length,
                             batch_tokens=max(pack_length, 1) * max(batch_size, 1), shard_size=len(records))
    scorer = Scorer(slots, settings)
    rows, skipped, _ = scorer.score_shard(records)
    dropped += [f"{reason}" for reason in skipped.values()]
    by_index = {row["index"]: row for row in rows}
    scored = [r for r in records if r.index in by_index]
    per_example = [{"id": r.id, "subset": r.subset, "kind": r.kind, "correct": r.correct,
                    **{k: v for k, v in by_index[r.index].items() if k not in ("index", "id", "kind")}}
                   for r in scored]
    base = {"model": name, "head": kind, "data": list(data), "benchmark": benchmark, "dropped": dropped,
            "truncated": int(sum(row.get("truncated", False) for row in rows)), "max_length": max_length,
            "records_skipped": report_in.skipped, "dtype": dtype}
    log(f"data: {report_in.summary()}; {len(scored)} examples scored, {base['truncated']} truncated at "
        f"max_length={max_length} (oldest prompt tokens), {len(dropped)} dropped")
    if rated:
        objectives = slots[0].reward.spec.objectives
        predicted = np.array([[by_index[r.index][f"rm_response[{o}]"] for o in objectives] for r in scored])
        target = np.array([[np.nan if v is None else v for v in _ratings(r, objectives)] for r in scored], np.float64)
        return {**base, **benchmarks.ratings_report(predicted, target, objectives), "per_example": per_example}
    results = [benchmarks.Result(r.id, r.subset, _scores(by_index[r.index], r.response_names, kind), r.correct)
               for r in scored]
    mapping = benchmarks.load_categories(categories) if categories else None
    report = (benchmarks.generic(results, mapping) if benchmark == "generic"
              else benchmarks.BENCHMARKS[benchmark](results))
    kinds = [r.kind for r in scored]
    report["kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    if kind == "lm":
        report["implicit_reward"] = {"beta": beta, "reduction": reduction}
    if kind not in ("lm", "judge") and slots[0].reward.spec.objectives:
        report["objectives"] = list(slots[0].reward.spec.objectives)
        report["reward"] = (f"objective {objective}" if objective else
                            "the gated score" if slots[0].reward.spec.gated or kind == "urm" else "the objectives' mean")
    return {**base, **report, "per_example": per_example}


def _ratings(record, objectives: tuple[str, ...]) -> list:
    values = dict(record.ratings)
    unknown = sorted(set(values) - set(objectives))
    if unknown:
        raise DataError(f"{record.place}: field 'ratings' names {unknown}, which are not objectives of the reward "
                        f"head {list(objectives)}; map or drop them")
    return [values.get(o) for o in objectives]


def write_report(report: dict, out: str | Path) -> tuple[Path, ...]:
    """``out`` (JSON, without the per-example rewards), the same name with .md (markdown tables) and
    with .rewards.jsonl (one line per example: id, subset and every response's reward)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = report.get("per_example", [])
    summary = {k: v for k, v in report.items() if k != "per_example"}
    rewards = out.with_suffix(".rewards.jsonl")
    summary["per_example_file"] = rewards.name
    out.write_text(json.dumps(summary, indent=2))
    md = out.with_suffix(".md")
    md.write_text(benchmarks.markdown(summary))
    rewards.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, md, rewards
