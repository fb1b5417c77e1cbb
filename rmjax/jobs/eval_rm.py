"""The reward-model evaluation job (``rmjax eval-rm``): any reward model on any dataset, and
RewardBench 1 / 2 as their leaderboards score them.

    report = run(EvalConfig(...))                           or, from Python,
    report = evaluate_rm(model=..., data=("llmbar",))        an explicit RM: any reward head rmjax reads
                                                             (``rmjax.heads.reward``: *ForSequenceClassification,
                                                             ArmoRM, URM, QRM, rmjax exports, BASE+ADAPTER), an
                                                             exported judge, or an exported DPO policy
    evaluate_rm(policy=P, reference=R, beta=, reduction=)    the implicit reward beta * (log pi - log pi_ref)
    evaluate_rm(policy=P, reference="")                      reference-free: beta * log pi (sum or mean)
    evaluate_rm(..., benchmark="rewardbench2", data=(FILE,)) the leaderboard's rules (``rmjax.benchmarks``)

The rewards come from the bulk scoring engine ``rmjax score`` uses (``rmjax.scoring.bulk.Scorer``:
packed prompt trees, or the prompt's KV cache with ``batch.layout=kv``), so every head is computed one
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
from rmjax import config as rconfig
from rmjax.config import knob, section
from rmjax.data.records import RecordReport
from rmjax.errors import ConfigError, DataError, RmjaxError
from rmjax.heads.reward import export_settings, with_objective
from rmjax.models.config import Numerics
from rmjax.models.loading import load_model
from rmjax.scoring.bulk import (
    ModelSlot,
    Scorer,
    ScoreSettings,
    judge_spec,
    same_tokenizer,
)
from rmjax.sections import DataSection, ScoringBatch
from rmjax.train.examples import read_inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalModels(Numerics):
    """The reward model evaluated (``name``), or a policy and its reference (the implicit reward)."""

    name: str = knob("", "a reward model: HF *ForSequenceClassification dir (incl. ArmoRM, URM, QRM), an rmjax "
                         "export (final/), BASE+ADAPTER_DIR, an adapter dir")
    policy: str = knob("", "implicit reward: the policy model (instead of name)")
    reference: str = knob("", "implicit reward: the reference model ('' = reference-free)")
    objective: str = knob("", "a multi-objective RM: rank by this objective ('' = their mean)")


@dataclasses.dataclass(kw_only=True)
class EvalData(DataSection):
    paths: tuple[str, ...] = knob(("llmbar",), "jsonl / parquet / datasets dirs, hh-rlhf[:SUBSETS], "
                                               "llmbar[:SUBSETS]")


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    model: EvalModels = section(EvalModels)
    data: EvalData = section(EvalData, max_length=2048)
    batch: ScoringBatch = section(ScoringBatch, row_length=1024)
    benchmark: str = knob("generic", "generic (any data: ties share), rewardbench (RB1: strict wins, 4 sections "
                                     "weighted as the leaderboard, score = their mean) or rewardbench2 (RB2: "
                                     "best-of-N, the Ties formula, score = the mean of the 6 subsets)",
                          tuple(benchmarks.BENCHMARKS))
    categories: str = knob("", "YAML/JSON {category: [subset, ...]}: an example-weighted roll-up (generic)")
    beta: float = knob(1.0, "implicit reward: beta x (log pi - log pi_ref)")
    reduction: str = knob("sum", "implicit reward: the sequence log-prob, sum or mean", ("sum", "mean"))
    out: str = knob("", "write the report as JSON here (markdown next to it, .md; every example's rewards, "
                        ".rewards.jsonl)")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.model.name) != bool(self.model.policy),
                 "give a reward model (--model) or a policy (--policy, the implicit reward), not both"),
                (self.batch.layout in ("packed", "kv"), "batch.layout must be packed or kv for evaluation"),
                (not self.categories or self.benchmark == "generic",
                 f"categories roll subsets up for any data; {self.benchmark} has its own sections")]


# keyword arguments of ``evaluate_rm`` -> config keys (the Python shorthand of the job)
_KEYWORDS = {"model": "model.name", "policy": "model.policy", "reference": "model.reference",
             "objective": "model.objective", "dtype": "model.dtype", "data": "data.paths", "split": "data.split",
             "columns": "data.columns", "ratings": "data.ratings", "max_length": "data.max_length",
             "template": "data.template", "on_error": "data.on_error", "batch_size": "batch.batch_size",
             "benchmark": "benchmark", "categories": "categories", "beta": "beta", "reduction": "reduction",
             "out": "out"}


def eval_config(**kwargs) -> EvalConfig:
    """An ``EvalConfig`` from ``evaluate_rm``'s keywords (``pack_length`` 0: the KV layout, else packed
    rows of that length)."""

    config = EvalConfig()
    pack = kwargs.pop("pack_length", None)
    if pack is not None:
        rconfig.set_key(config, "batch.layout", "kv" if pack == 0 else "packed", "pack_length")
        if pack:
            rconfig.set_key(config, "batch.row_length", pack, "pack_length")
    for name, value in kwargs.items():
        if name not in _KEYWORDS:
            raise ConfigError(f"evaluate_rm: unknown keyword {name!r}; one of {sorted(_KEYWORDS) + ['pack_length']}")
        if value is None:
            continue
        rconfig.set_key(config, _KEYWORDS[name], list(value) if isinstance(value, tuple) else value, name)
    return rconfig.validate(config, "evaluate_rm")


def evaluate_rm(model: str = "", log=None, **kwargs) -> dict:
    """``run`` on the config these keywords give (``eval_config``)."""
    return run(eval_config(model=model, **kwargs), log=log)


def model_slots(models: EvalModels, beta: float = 1.0):
    """(the scoring slots, the head kind, beta, a name) of an explicit or implicit reward model."""

    model, policy, reference = models.name, models.policy, models.reference
    loaded = load_model(model or policy, models)
    if model and loaded.reward_head is not None:
        head = with_objective(loaded.reward_head, models.objective or None)
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
        ref = load_model(ref_name, models)
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


def run(config: EvalConfig, log=None) -> dict:
    """The report dict (``rmjax.benchmarks``), with the rewards of every example under ``per_example``;
    written to ``config.out`` (and .md, .rewards.jsonl) when given."""

    m, d, b = config.model, config.data, config.batch
    benchmark, beta, reduction, objective = config.benchmark, config.beta, config.reduction, m.objective or None
    data, max_length = tuple(d.paths), d.max_length
    log = log or (lambda msg: print(msg, file=sys.stderr))
    slots, kind, beta, name = model_slots(m, beta)
    report_in = RecordReport()
    records = read_inputs(data, d.on_error, report_in, **d.read_options())
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
    row = b.row_length if b.layout == "packed" else 0
    settings = ScoreSettings(beta=beta, reduction=reduction, template=d.template, max_length=max_length,
                             over_length=d.over_length, batch_size=b.batch_size, pack_length=row,
                             batch_tokens=max(row, 1) * b.batch_size, shard_size=len(records))
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
            "records_skipped": report_in.skipped, "dtype": m.dtype}
    log(f"data: {report_in.summary()}; {len(scored)} examples scored, {base['truncated']} truncated at "
        f"max_length={max_length} (oldest prompt tokens), {len(dropped)} dropped")
    if rated:
        objectives = slots[0].reward.spec.objectives
        predicted = np.array([[by_index[r.index][f"rm_response[{o}]"] for o in objectives] for r in scored])
        target = np.array([[np.nan if v is None else v for v in _ratings(r, objectives)] for r in scored], np.float64)
        return _written({**base, **benchmarks.ratings_report(predicted, target, objectives),
                         "per_example": per_example}, config.out)
    results = [benchmarks.Result(r.id, r.subset, _scores(by_index[r.index], r.response_names, kind), r.correct)
               for r in scored]
    mapping = benchmarks.load_categories(config.categories) if config.categories else None
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
    return _written({**base, **report, "per_example": per_example}, config.out)


def _written(report: dict, out: str) -> dict:
    if out:
        for path in write_report(report, out):
            print(f"wrote {path}", file=sys.stderr)
    return report


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
