"""Optimal and pessimal words: the k best- and worst-ranked words of each model under each prompt."""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from rmjax.analysis.dictionary import Dictionary
from rmjax.analysis.scores import prompt_framing

COLUMNS = ["model", "family", "prompt", "framing", "end", "position", "word", "score", "rank", "categories"]


def extreme_words(ranks: pd.DataFrame, dictionary: Dictionary, families: Mapping[str, str], k: int = 10
                  ) -> pd.DataFrame:
    """`end` is `top` (position 1 = highest score) or `bottom` (position 1 = lowest score).

    Words with equal scores are listed alphabetically, so the table does not depend on file row order.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    categories = {w: ";".join(c for c in dictionary.categories if c in cats)
                  for w, cats in dictionary.memberships.items()}
    parts = []
    for end, ascending in (("top", True), ("bottom", False)):
        ordered = ranks.sort_values(["model", "prompt", "rank", "word"], ascending=[True, True, ascending, True],
                                    kind="mergesort")
        chosen = ordered.groupby(["model", "prompt"], sort=False).head(k).copy()
        chosen["position"] = chosen.groupby(["model", "prompt"], sort=False).cumcount() + 1
        chosen["end"] = end
        parts.append(chosen)
    table = pd.concat(parts, ignore_index=True)
    table["family"] = table["model"].map(families)
    table["framing"] = table["prompt"].map(prompt_framing)
    table["categories"] = table["word"].map(categories)
    model_order = list(dict.fromkeys(ranks["model"]))
    prompt_order = list(dict.fromkeys(ranks["prompt"]))
    table = table.assign(_m=table["model"].map(model_order.index), _p=table["prompt"].map(prompt_order.index),
                         _e=table["end"].map(["top", "bottom"].index))
    table = table.sort_values(["_m", "_p", "_e", "position"], kind="mergesort")
    return table[COLUMNS].reset_index(drop=True)
