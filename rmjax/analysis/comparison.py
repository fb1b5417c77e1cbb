"""Family comparison per (framing, category) panel: means, Cohen's d and a permutation test over cells.

With two families A < B (sorted by name) the contrast is B minus A, i.e. llama minus gemma; a negative d
then means llama gives that category smaller (better) median ranks. With more than two families every
pair is compared, one row per pair, and Bonferroni counts every (panel, pair) test.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from rmjax.analysis.cells import FRAMINGS
from rmjax.errors import DataError

_CHUNK = 2048  # permutations drawn at once; bounds memory at CHUNK x cells


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """(mean(x) - mean(y)) / pooled SD, the pooled SD using n - 1 in each group."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    nx, ny = len(x), len(y)
    if nx < 2 or ny < 2:
        return float("nan")
    pooled_var = ((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2)
    if pooled_var == 0:
        return float("nan")
    return float((x.mean() - y.mean()) / np.sqrt(pooled_var))


def permutation_p_value(values: np.ndarray, in_group: np.ndarray, permutations: int,
                        rng: np.random.Generator) -> float:
    """Two-sided permutation test of mean(values[in_group]) - mean(values[~in_group]).

    The group labels are shuffled over the values; p = (hits + 1) / (permutations + 1), where a hit is a
    shuffle whose absolute difference reaches the observed one (equal up to float rounding counts).
    """
    values = np.asarray(values, float)
    in_group = np.asarray(in_group, bool)
    n, n_in = len(values), int(in_group.sum())
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    if n_in == 0 or n_in == n:
        raise ValueError("both groups need at least one value")
    total = values.sum()

    def mean_difference(sum_in: np.ndarray | float) -> np.ndarray | float:
        return sum_in / n_in - (total - sum_in) / (n - n_in)

    observed = abs(mean_difference(values[in_group].sum()))
    tolerance = 1e-9 * max(1.0, observed, float(np.abs(values).max()))
    hits, done = 0, 0
    while done < permutations:
        size = min(_CHUNK, permutations - done)
        labels = rng.permuted(np.broadcast_to(in_group, (size, n)), axis=1)
        shuffled = np.abs(mean_difference(labels @ values))
        hits += int(np.count_nonzero(shuffled >= observed - tolerance))
        done += size
    return (hits + 1) / (permutations + 1)


def compare_families(cells: pd.DataFrame, permutations: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """One row per (framing, category[, family pair]); see the module docstring for the sign and columns."""
    families = sorted(cells["family"].unique())
    if len(families) < 2:
        raise DataError(f"comparing families needs at least two, found only {families}; add score files of RMs "
                        "from another base model or fix --families")
    pairs = list(combinations(families, 2))
    framings = [f for f in FRAMINGS if f in set(cells["framing"])]
    categories = list(dict.fromkeys(cells["category"]))
    rows = []
    for framing in framings:
        for category in categories:
            panel = cells[(cells["framing"] == framing) & (cells["category"] == category)]
            if panel.empty:
                continue
            by_family = {f: panel.loc[panel["family"] == f, "median_rank"].to_numpy(float) for f in families}
            for first, second in pairs:
                test_index = len(rows)
                a, b = by_family[first], by_family[second]
                row = {"framing": framing, "category": category}
                if len(pairs) > 1:
                    row.update(family_a=first, family_b=second)
                row.update({f"{f}_mean": (by_family[f].mean() if len(by_family[f]) else np.nan) for f in families})
                row["cohens_d"] = cohens_d(b, a)
                if len(a) and len(b):
                    values = np.concatenate([a, b])
                    in_second = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
                    rng = np.random.default_rng([seed, test_index])
                    row["p_perm"] = permutation_p_value(values, in_second, permutations, rng)
                else:
                    row["p_perm"] = np.nan
                row.update({f"n_{f}": len(by_family[f]) for f in families})
                rows.append(row)
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("p_perm") + 1, "p_bonferroni",
                 np.minimum(1.0, table["p_perm"] * table["p_perm"].notna().sum()))
    return table
