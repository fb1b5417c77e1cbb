"""Benchmarks as their leaderboards score them: a small registry of evaluators over per-example rewards.

    report = BENCHMARKS[name](results)        name: generic | rewardbench | rewardbench2

``results`` is one ``Result`` per example: its subset, its id and the reward of each response in
record order (the ``correct`` leading ones are correct). The rules are those of allenai/reward-bench
(``scripts/run_rm.py``, ``scripts/run_v2.py``, ``rewardbench/utils.py``):

    generic        per example 1 / (responses tied at the top) when the first correct response is at
                   the top, else 0 (so a tied pair counts 0.5); accuracy overall and per subset
    rewardbench    RewardBench 1: a pair is won when chosen > rejected strictly (a tie loses); subsets
                   roll up into the four sections Chat, Chat Hard, Safety, Reasoning, each the mean of its
                   subsets weighted by ``EXAMPLE_COUNTS`` (which counts math-prm as 984 examples, so math
                   weighs as much as code); the leaderboard number is the mean of the four sections
    rewardbench2   RewardBench 2: best-of-N, 1 / (responses tied at the top) when the first chosen is at
                   the top, else 0; the Ties subset by its own formula over its ``ref:N`` / ``tied:N``
                   prompt groups (``ties_score``); the leaderboard number is the unweighted mean of the six
                   subsets

Every subset, section and leaderboard number carries a 95% interval: Wilson for a mean of per-example
scores, and for the others (weighted sections, the Ties formula, the means of means) a percentile
bootstrap that resamples the examples (Ties: the prompt groups) within each subset.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from rmjax.errors import DataError
from rmjax.metrics import accuracy_report, best_of_n_scores, ratings_report, wilson  # noqa: F401 (reports)
from rmjax.metrics import group as _group

# allenai/reward-bench rewardbench/constants.py (RewardBench 1)
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SECTIONS = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
RB2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")
BOOTSTRAP_RESAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class Result:
    """One example's rewards: ``scores`` [responses] in record order, the ``correct`` first ones correct."""

    id: str
    subset: str
    scores: np.ndarray
    correct: int = 1


def _interval(stat: Callable[[dict[str, np.ndarray]], dict[str, float]], units: dict[str, int], seed: int = 0
              ) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap intervals of every number ``stat`` returns, resampling the units of
    each subset on their own (``units``: subset -> count). Written here because the statistic is a
    dict of numbers computed from several independently resampled strata at once."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(BOOTSTRAP_RESAMPLES):
        picked = {s: rng.integers(0, n, n) for s, n in units.items()}
        for k, v in stat(picked).items():
            draws.setdefault(k, []).append(v)
    return {k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))) for k, v in draws.items()}


def _by_subset(results: list[Result]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(r.subset or "all", []).append(r)
    return out


def first_correct_wins(r: Result) -> float:
    """1 / (responses tied at the top) when the first correct response is at the top, else 0."""
    scores = np.asarray(r.scores, np.float64)
    return float(best_of_n_scores(scores[None])[0])


def strict_win(r: Result) -> float:
    """RewardBench 1: 1 when chosen scores strictly above every rejected response, else 0."""
    scores = np.asarray(r.scores, np.float64)
    return float(scores[0] > scores[r.correct:].max())


# ---------------------------------------------------------------- generic

def load_categories(path) -> dict[str, list[str]]:
    """{category: [subset, ...]} from a YAML or JSON file."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: category mapping not found")
    data = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                             for v in data.values()):
        raise DataError(f"{path}: expected a mapping {{category: [subset, ...]}}")
    return data


def generic(results: list[Result], categories: dict[str, list[str]] | None = None) -> dict:
    """Any data: the first correct response at the top wins (a tie shares: 0.5 for a pair)."""
    report = accuracy_report([first_correct_wins(r) for r in results], [r.subset for r in results], categories)
    return {"benchmark": "generic", **report}


# ---------------------------------------------------------------- RewardBench 1

def rewardbench(results: list[Result]) -> dict:
    """RewardBench 1's leaderboard (see the module docstring)."""
    subsets = _by_subset(results)
    wins = {s: np.array([strict_win(r) for r in rs]) for s, rs in subsets.items()}
    known = {s for members in SECTIONS.values() for s in members}

    def numbers(picked: dict[str, np.ndarray]) -> dict[str, float]:
        acc = {s: float(wins[s][idx].mean()) for s, idx in picked.items()}
        out = {f"subset/{s}": a for s, a in acc.items()}
        sections = {}
        for name, members in SECTIONS.items():
            present = [m for m in members if m in acc]
            if present:
                weights = np.array([EXAMPLE_COUNTS[m] for m in present], np.float64)
                sections[name] = float(np.dot([acc[m] for m in present], weights) / weights.sum())
                out[f"section/{name}"] = sections[name]
        out["score"] = float(np.mean(list(sections.values()))) if sections else float("nan")
        return out

    everything = {s: np.arange(len(v)) for s, v in wins.items()}
    point = numbers(everything)
    ci = _interval(numbers, {s: len(v) for s, v in wins.items()})
    report = {"benchmark": "rewardbench", "score": point["score"], "score_ci95": list(ci["score"]),
              "examples": len(results), "subsets": {s: _group(v) for s, v in wins.items()}, "sections": {}}
    for name, members in SECTIONS.items():
        present = [m for m in members if m in wins]
        if present:
            report["sections"][name] = {"accuracy": point[f"section/{name}"], "ci95": list(ci[f"section/{name}"]),
                                        "examples": int(sum(len(wins[m]) for m in present)), "subsets": present,
                                        "weights": {m: EXAMPLE_COUNTS[m] for m in present}}
    missing = [name for name in SECTIONS if name not in report["sections"]]
    if missing:
        report["partial"] = f"no examples of section(s) {missing}: the score is the mean of the sections present"
    loose = sorted(set(wins) - known)
    if loose:
        report["uncategorised_subsets"] = loose
    return report


# ---------------------------------------------------------------- RewardBench 2

def ties_groups(results: list[Result]) -> dict[int, dict[str, Result]]:
    """The Ties subset's prompt groups: {prompt id: {"ref": result, "tied": result}} from ids ``ref:N``
    (one correct answer) and ``tied:N`` (several correct answers)."""
    groups: dict[int, dict[str, Result]] = {}
    for r in results:
        kind, _, number = str(r.id).partition(":")
        if kind not in ("ref", "tied") or not number.strip().isdigit():
            raise DataError(f"Ties example {r.id!r}: RewardBench 2's Ties ids are 'ref:N' (the reference prompt) "
                            "and 'tied:N' (its prompt with several correct answers); fix the id")
        if kind in groups.setdefault(int(number), {}):
            raise DataError(f"Ties example {r.id!r} appears twice; each prompt group has one ref and one tied")
        if kind == "tied" and r.correct < 2:
            raise DataError(f"Ties example {r.id!r}: a tied prompt has several correct answers (chosen is a list "
                            f"of at least two); it has {r.correct}")
        groups[int(number)][kind] = r
    lonely = sorted(f"{next(iter(g))}:{n}" for n, g in groups.items() if len(g) == 1)
    if lonely:
        other = {"ref": "tied", "tied": "ref"}
        first = lonely[0]
        raise DataError(f"Ties example {first!r} has no {other[first.split(':')[0]]}:{first.split(':')[1]} "
                        f"partner ({len(lonely)} such ids); the Ties score compares each reference prompt with its "
                        "tied prompt, so give both or neither")
    return groups


def _prompt_stats(r: Result) -> tuple[bool, float, float]:
    """(accurate, spread of the correct answers' rewards, worst correct - best incorrect)."""
    s = np.asarray(r.scores, np.float64)
    correct, wrong = s[:r.correct], s[r.correct:]
    gap = correct.min() - wrong.max()
    return bool(gap > 0), float(correct.max() - correct.min()), float(gap)


def ties_score(groups: dict[int, dict[str, Result]], order: np.ndarray | None = None) -> dict[str, float]:
    """RewardBench 2's Ties score (``process_single_model``): 0.3 x tied accuracy + 0.3 x reference
    accuracy + 0.2 x P(the correct-vs-incorrect gap of the tied prompt > the spread of its correct
    answers) + 0.2 x P(the smaller gap of tied and reference prompt > that spread) + 0.01 x the mean
    of tanh(smaller gap / spread - 1) (0 where undefined). ``order``: the prompt groups to use (a
    bootstrap resample), all by default."""
    ids = sorted(groups)
    picked = [ids[i] for i in (np.arange(len(ids)) if order is None else order)]
    ref = np.array([_prompt_stats(groups[p]["ref"]) for p in picked], np.float64).reshape(-1, 3)
    tied = np.array([_prompt_stats(groups[p]["tied"]) for p in picked], np.float64).reshape(-1, 3)
    spread, gap_tied, gap_ref = tied[:, 1], tied[:, 2], ref[:, 2]
    harder = np.minimum(gap_ref, gap_tied)
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.nan_to_num(np.tanh(harder / spread - 1), nan=0.0)
    parts = {"tied_accuracy": float(tied[:, 0].mean()), "ref_accuracy": float(ref[:, 0].mean()),
             "correctness_preferred": float(np.mean(gap_tied > spread)),
             "correctness_preferred_hard": float(np.mean(harder > spread)),
             "correctness_margin_score": float(margin.mean())}
    parts["score"] = (0.30 * parts["tied_accuracy"] + 0.30 * parts["ref_accuracy"] + 0.20 * parts["correctness_preferred"]
                      + 0.20 * parts["correctness_preferred_hard"] + 0.01 * parts["correctness_margin_score"])
    return parts


def rewardbench2(results: list[Result]) -> dict:
    """RewardBench 2's leaderboard (see the module docstring)."""
    subsets = _by_subset(results)
    ties_name = next((s for s in subsets if s.lower() == "ties"), None)
    groups = ties_groups(subsets[ties_name]) if ties_name else {}
    wins = {s: np.array([first_correct_wins(r) for r in rs]) for s, rs in subsets.items() if s != ties_name}

    def numbers(picked: dict[str, np.ndarray]) -> dict[str, float]:
        out = {f"subset/{s}": float(wins[s][idx].mean()) for s, idx in picked.items() if s != ties_name}
        if ties_name:
            out[f"subset/{ties_name}"] = ties_score(groups, picked[ties_name])["score"]
        out["score"] = float(np.mean([v for k, v in out.items() if k.startswith("subset/")]))
        return out

    units = {**{s: len(v) for s, v in wins.items()}, **({ties_name: len(groups)} if ties_name else {})}
    point = numbers({s: np.arange(n) for s, n in units.items()})
    ci = _interval(numbers, units)
    report = {"benchmark": "rewardbench2", "score": point["score"], "score_ci95": list(ci["score"]),
              "examples": len(results), "subsets": {s: _group(v) for s, v in wins.items()}}
    if ties_name:
        parts = ties_score(groups)
        report["subsets"][ties_name] = {"accuracy": parts["score"], "ci95": list(ci[f"subset/{ties_name}"]),
                                        "examples": len(subsets[ties_name]), "prompt_groups": len(groups),
                                        "components": {k: v for k, v in parts.items() if k != "score"}}
    report["subsets"] = {s: report["subsets"][s] for s in subsets}  # input order
    missing = [s for s in RB2_SUBSETS if s not in subsets]
    if missing:
        report["partial"] = f"no examples of subset(s) {missing}: the score is the mean of the subsets present"
    return report


BENCHMARKS: dict[str, Callable[[list[Result]], dict]] = {
    "generic": generic, "rewardbench": rewardbench, "rewardbench2": rewardbench2}


def markdown(report: dict) -> str:
    """A report as markdown tables: the leaderboard number first, sections, subsets, categories; or
    the MSE per objective of a ratings report."""
    def ci(g):
        lo, hi = g["ci95"]
        return f"[{lo:.3f}, {hi:.3f}]"

    lines = [f"# {report.get('benchmark', 'Reward-model evaluation')}: {report.get('model', '')}", ""]
    if "objectives" in report and isinstance(report["objectives"], dict):
        lines += ["| objective | MSE | Pearson r | rated |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['mse']:.4f} | {v['pearson']:.3f} | {v['rated']} |" for k, v in report["objectives"].items()]
        return "\n".join(lines) + "\n"
    if "score" in report:
        lo, hi = report["score_ci95"]
        lines += [f"**score {report['score']:.4f}** [95% CI {lo:.4f}, {hi:.4f}] on {report['examples']} examples", ""]
        if report.get("partial"):
            lines += [f"partial: {report['partial']}", ""]
    if report.get("sections"):
        lines += ["| section | score | 95% CI | examples |", "|---|---|---|---|"]
        lines += [f"| {n} | {g['accuracy']:.4f} | {ci(g)} | {g['examples']} |" for n, g in report["sections"].items()]
        lines.append("")
    lines += ["| subset | accuracy | 95% CI | examples |", "|---|---|---|---|"]
    lines += [f"| {n} | {g['accuracy']:.3f} | {ci(g)} | {g['examples']} |" for n, g in report["subsets"].items()]
    if "score" not in report and "accuracy" in report:
        lines.append(f"| **all** | {report['accuracy']:.3f} | {ci(report)} | {report['examples']} |")
    if report.get("categories"):
        lines += ["", "| category | accuracy | 95% CI | examples |", "|---|---|---|---|"]
        lines += [f"| {n} | {g['accuracy']:.3f} | {ci(g)} | {g['examples']} |" for n, g in report["categories"].items()]
    return "\n".join(lines) + "\n"
