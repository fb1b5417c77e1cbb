"""From scores to cells: word ranks within each (model, prompt), then the median rank per category.

Which words are ranked (`ranked_words`):
- `all_terms`: every dictionary word that every model scored (2,040 MFD 2.0 terms);
- `authors`: the words the authors' R code (`figures/generate_figure_1_and_A1.R`, commit 5d8d2e9) ranks. For
  MFD 2.0 it reshapes the dictionary with `pivot_longer(Care_Virtue:Sanctity_Virtue)`, a column range that
  ends one column before the file's last column `Sanctity_Vice`, then keeps the rows marked "X": the 388
  terms marked only in `Sanctity_Vice` are never ranked, every (model, prompt) ranks the other 1,652 terms, and
  the Sanctity cells are the median ranks of the 272 `Sanctity_Virtue` terms alone. For a dictionary without
  both of those columns (the Big Two nouns) the authors rank every word, as `all_terms` does.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from rmjax.analysis.dictionary import Dictionary
from rmjax.analysis.notes import examples, warn
from rmjax.analysis.scores import ScoreSet, prompt_framing
from rmjax.errors import DataError

FRAMINGS = ("positive", "negative")
RANKINGS = ("authors", "all_terms")
# first and last column of the authors' pivot_longer(Care_Virtue:Sanctity_Virtue) over the MFD 2.0 columns
AUTHORS_MFD_COLUMNS = ("Care_Virtue", "Sanctity_Virtue")


def analysis_words(scores: ScoreSet, dictionary: Dictionary) -> list[str]:
    """Dictionary words that every model scored, sorted.

    Ranks are only comparable across models when they rank the same words, so a dictionary word that some
    models lack is left out for all of them; every such omission is reported with counts per model.
    """
    dictionary_words = set(dictionary.memberships)
    scored = {m: set(t.index) for m, t in scores.tables.items()}
    by_any = set().union(*scored.values()) & dictionary_words
    if not by_any:
        first = next(iter(scores.tables.values()))
        raise DataError(f"no response in the score files is a {dictionary.name} word (e.g. responses "
                        f"{examples(list(first.index), 3)}; dictionary words {examples(dictionary.words, 3)}); "
                        "score the dictionary's words or choose the dictionary they come from")
    outside = {m: sorted(words - dictionary_words) for m, words in scored.items()}
    outside = {m: v for m, v in outside.items() if v}
    if outside:
        warn(f"responses that are not {dictionary.name} words are not used: {_per_model(outside, len(scored))}")
    never = sorted(dictionary_words - by_any)
    if never:
        warn(f"{len(never)} of {len(dictionary_words)} {dictionary.name} words are scored by no model: {examples(never)}")
    lacking = {m: sorted(by_any - words) for m, words in scored.items()}
    lacking = {m: v for m, v in lacking.items() if v}
    if lacking:
        warn("dictionary words missing from some score files are left out for every model so that ranks stay "
             f"comparable; missing: {_per_model(lacking, len(scored))}")
    words = sorted(set.intersection(*scored.values()) & dictionary_words)
    if len(words) < 2:
        raise DataError(f"only {len(words)} {dictionary.name} word(s) are scored by every model; ranking needs at "
                        "least two")
    empty = [c for c in dictionary.categories if not any(c in dictionary.memberships[w] for w in words)]
    if empty:
        warn(f"{len(empty)} dictionary categories have no scored word and get no cells: {examples(empty)}")
    return words


def _per_model(words_by_model: dict[str, list[str]], n_models: int) -> str:
    """`m1: 2 (a, b); m2: 1 (c)`, or one entry when every model has the same words."""
    lists = list(words_by_model.values())
    if n_models > 1 and len(lists) == n_models and all(v == lists[0] for v in lists):
        return f"each of the {n_models} models: {len(lists[0])} ({examples(lists[0])})"
    return "; ".join(f"{m}: {len(v)} ({examples(v, 3)})" for m, v in words_by_model.items())


def ranked_words(words: list[str], dictionary: Dictionary, ranking: str = "all_terms") -> list[str]:
    """The words (of `words`, in their order) that `ranking` ranks; see the module docstring."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {list(RANKINGS)}")
    first, last = AUTHORS_MFD_COLUMNS
    if ranking == "all_terms" or first not in dictionary.columns or last not in dictionary.columns:
        return list(words)
    columns = dictionary.columns
    kept = frozenset(columns[columns.index(first):columns.index(last) + 1])
    ranked = [w for w in words if dictionary.column_memberships.get(w, frozenset()) & kept]
    ranked_set = set(ranked)
    left_out = [w for w in words if w not in ranked_set]
    if left_out:
        outside = sorted(set().union(*(dictionary.column_memberships.get(w, frozenset()) for w in left_out)))
        warn(f"ranking 'authors': {len(left_out)} of {len(words)} {dictionary.name} words are not ranked (marked "
             f"only in {', '.join(outside)}, outside the authors' pivot_longer({first}:{last})), so each "
             f"(model, prompt) ranks {len(ranked)} words, e.g. not ranked: {examples(left_out, 3)}; ranking "
             "'all_terms' ranks every word")
    if len(ranked) < 2:
        raise DataError(f"ranking 'authors' leaves {len(ranked)} {dictionary.name} word(s) to rank; use ranking "
                        "'all_terms'")
    return ranked


def rank_words(scores: ScoreSet, words: list[str]) -> pd.DataFrame:
    """Long table model, prompt, word, score, rank; rank 1 = highest score within (model, prompt), ties averaged."""
    frames = []
    for model, table in scores.tables.items():
        matrix = table.loc[words, scores.prompts].to_numpy(dtype=float)
        ranks = rankdata(-matrix, axis=0, method="average")
        frames.append(pd.DataFrame({
            "model": model,
            "prompt": np.tile(scores.prompts, len(words)),
            "word": np.repeat(words, len(scores.prompts)),
            "score": matrix.ravel(),
            "rank": ranks.ravel(),
        }))
    return pd.concat(frames, ignore_index=True)


def compute_cells(ranks: pd.DataFrame, dictionary: Dictionary, families: Mapping[str, str]) -> pd.DataFrame:
    """Median rank per (model, prompt, category): model, family, prompt, framing, category, median_rank.

    A word in several categories counts in each of them.
    """
    pairs = dictionary.pairs()
    joined = ranks.merge(pairs, on="word", how="inner")
    cells = (joined.groupby(["model", "prompt", "category"], sort=False)["rank"].median()
             .rename("median_rank").reset_index())
    cells.insert(1, "family", cells["model"].map(families))
    cells.insert(3, "framing", cells["prompt"].map(prompt_framing))
    model_order = list(dict.fromkeys(ranks["model"]))
    prompt_order = list(dict.fromkeys(ranks["prompt"]))
    cells["_m"] = cells["model"].map(model_order.index)
    cells["_p"] = cells["prompt"].map(prompt_order.index)
    cells["_c"] = cells["category"].map(dictionary.categories.index)
    return cells.sort_values(["_m", "_p", "_c"]).drop(columns=["_m", "_p", "_c"]).reset_index(drop=True)
