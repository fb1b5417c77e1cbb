"""The whole value-bias study: read scores and dictionary, compute every table and figure, write them to a folder."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pandas as pd

from rmjax.analysis.cells import (
    RANKINGS,
    analysis_words,
    compute_cells,
    rank_words,
    ranked_words,
)
from rmjax.analysis.comparison import TESTS, compare_families
from rmjax.analysis.dictionary import Dictionary, load_dictionary
from rmjax.analysis.extremes import extreme_words
from rmjax.analysis.families import assign_families, load_family_file
from rmjax.analysis.frequency import frequency_bias
from rmjax.analysis.mixed import fit_mixed_model
from rmjax.analysis.notes import ValueBiasWarning, warn
from rmjax.analysis.report import render_report
from rmjax.analysis.scores import load_scores, prompt_framing
from rmjax.analysis.similarity import mds_map, model_similarity
from rmjax.errors import ConfigError


@dataclass
class ValueBiasResult:
    scores_dir: Path
    dictionary: Dictionary
    families: dict[str, str]
    prompts: list[str]
    words: list[str]
    ranks: pd.DataFrame  # every word of `words`, for the best/worst words and the frequency bias
    cells: pd.DataFrame  # from the ranks of `ranked_words`
    ranked_words: list[str]
    ranking: str
    test: str
    comparison: pd.DataFrame | None
    mixed: pd.DataFrame | None
    mixed_facts: dict[str, object]
    similarity: pd.DataFrame
    mds: pd.DataFrame
    extremes: pd.DataFrame
    frequency: pd.DataFrame
    permutations: int
    seed: int
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @staticmethod
    def framing_of(prompt: str) -> str:
        return prompt_framing(prompt)

    @property
    def dictionary_words_per_category(self) -> dict[str, int]:
        used = set(self.words)
        return {c: sum(1 for w in self.dictionary.words_in(c) if w in used) for c in self.dictionary.categories}


class _WarningLog:
    """Collects the analysis' warnings (for report.md) and shows each one as soon as its stage ends."""

    def __init__(self, show: Callable[[str], None]):
        self.show, self.messages, self._seen = show, [], 0
        self._context = warnings.catch_warnings(record=True)

    def __enter__(self) -> Self:
        self._records = self._context.__enter__()
        warnings.simplefilter("always", ValueBiasWarning)
        return self

    def flush(self) -> None:
        for record in self._records[self._seen:]:
            if issubclass(record.category, ValueBiasWarning):
                self.messages.append(str(record.message))
                self.show(f"warning: {record.message}")
            else:
                self.show(f"{record.category.__name__}: {record.message}")
        self._seen = len(self._records)

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self._context.__exit__(*exc)


def run_value_bias(scores_dir: str | Path, dictionary: str | Path, out_dir: str | Path, *,
                   families_file: str | Path | None = None, permutations: int = 10_000, seed: int = 0,
                   top_k: int = 10, keep_valence: bool = False, common_prompts: bool = False,
                   ranking: str = "all_terms", test: str = "permutation",
                   figures: bool = True, progress: Callable[[str], None] = print) -> ValueBiasResult:
    """Every table, figure and report.md of the study in `out_dir`.

    `ranking` picks the words ranked for the cells (`all_terms`, or `authors`: the words the authors' R code
    ranks, see `rmjax.analysis.cells`) and `test` the family test per panel (`permutation`, or `welch`: the
    Welch t-test behind the stars of the authors' Figure 1, see `rmjax.analysis.comparison`). The authors'
    released Figure 1 numbers come from `ranking="authors", test="welch"`.
    """
    if ranking not in RANKINGS:
        raise ConfigError(f"--ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if test not in TESTS:
        raise ConfigError(f"--test must be one of {', '.join(TESTS)}, got {test!r}")
    if permutations < 1:
        raise ConfigError(f"--permutations must be at least 1, got {permutations}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the results")
    files: list[str] = []

    def write(table: pd.DataFrame, name: str) -> None:
        table.to_csv(out / name, index=False)
        files.append(name)

    with _WarningLog(progress) as log:
        progress(f"[1/8] reading scores from {scores_dir}")
        scores = load_scores(scores_dir, common_prompts=common_prompts)
        lexicon = load_dictionary(dictionary, keep_valence=keep_valence)
        given = load_family_file(families_file) if families_file else None
        families = assign_families(scores.models, given)
        n_negative = sum(prompt_framing(p) == "negative" for p in scores.prompts)
        progress(f"      {len(scores.models)} models ({_family_counts(families)}), {len(scores.prompts)} prompts "
                 f"({len(scores.prompts) - n_negative} positive, {n_negative} negative); dictionary "
                 f"{lexicon.name}: {len(lexicon.memberships)} words in {len(lexicon.categories)} categories")
        log.flush()

        progress("[2/8] ranking words within each (model, prompt) and taking median ranks per category")
        words = analysis_words(scores, lexicon)
        ranks = rank_words(scores, words)
        ranked = ranked_words(words, lexicon, ranking)
        cells = compute_cells(ranks if ranked == words else rank_words(scores, ranked), lexicon, families)
        out.mkdir(parents=True, exist_ok=True)
        write(cells, "cells.csv")
        progress(f"      {len(words)} words, {len(ranked)} ranked for the cells (ranking {ranking}), "
                 f"{len(cells)} cells")
        log.flush()

        how = f"{permutations:,} permutations, seed {seed}" if test == "permutation" else "Welch t-tests"
        progress(f"[3/8] comparing families per panel ({how})")
        comparison = mixed = None
        mixed_facts: dict[str, object] = {}
        if len(set(families.values())) < 2:
            warn(f"all models belong to family {next(iter(families.values()))!r}; the family comparison and the "
                 "mixed model need two families and were skipped")
        else:
            comparison = compare_families(cells, permutations=permutations, seed=seed, test=test)
            write(comparison, "comparison.csv")
            progress("[4/8] fitting the mixed-effects model")
            mixed, mixed_facts = fit_mixed_model(cells)
            write(mixed, "mixed_model.csv")
        log.flush()

        progress("[5/8] model similarity (Kendall tau, Spearman, RBO) and MDS")
        similarity = model_similarity(scores, words, families)
        mds = mds_map(similarity, scores.models, families)
        write(similarity, "similarity.csv")
        write(mds, "mds.csv")
        log.flush()

        progress(f"[6/8] optimal and pessimal words (top/bottom {top_k}) and frequency bias")
        extremes = extreme_words(ranks, lexicon, families, k=top_k)
        write(extremes, "extremes.csv")
        frequency = frequency_bias(ranks, families)
        write(frequency, "frequency.csv")
        log.flush()

        result = ValueBiasResult(
            scores_dir=Path(scores_dir), dictionary=lexicon, families=families, prompts=scores.prompts, words=words,
            ranks=ranks, cells=cells, ranked_words=ranked, ranking=ranking, test=test, comparison=comparison,
            mixed=mixed, mixed_facts=mixed_facts,
            similarity=similarity, mds=mds, extremes=extremes, frequency=frequency, permutations=permutations,
            seed=seed, files=files)
        if figures:
            progress("[7/8] drawing figures")
            files.extend(_draw_figures(result, out))
        log.flush()
    result.warnings = log.messages

    progress("[8/8] writing report.md")
    files.append("report.md")
    (out / "report.md").write_text(render_report(result))
    return result


def _draw_figures(result: ValueBiasResult, out: Path) -> list[str]:
    # matplotlib loads only when a figure is drawn
    from rmjax.analysis.figures import plot_mds, plot_panels, plot_similarity

    paths = plot_panels(result.cells, result.comparison, out / "panels", n_words=len(result.ranked_words))
    if len(result.families) > 1:
        paths += plot_similarity(result.similarity, list(result.families), result.families, out / "similarity")
        paths += plot_mds(result.mds, out / "mds")
    return [p.name for p in paths]


def _family_counts(families: dict[str, str]) -> str:
    counts = pd.Series(families).value_counts().sort_index()
    return ", ".join(f"{n} {f}" for f, n in counts.items())
