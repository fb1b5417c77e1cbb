"""Family comparison per (framing, category) panel: means, Cohen's d and a test over cells.

With two families A < B (sorted by name) the contrast is B minus A, i.e. llama minus gemma; a negative d
then means llama gives that category smaller (better) median ranks. With more than two families every
pair is compared, one row per pair, and Bonferroni counts every (panel, pair) test.

Tests (`test`):
- `permutation`: a two-sided permutation test of the mean difference (column `p_perm`);
- `welch`: Welch's two-sample t-test (SciPy `ttest_ind(equal_var=False)`, column `p_welch`). This is the
  p-value of the authors' Figure 1 stars: their R takes `MKinfer::perm.t.test(...)$p.value`, which is the
  parametric Welch t-test p-value (the permutation p-value of that function is `$perm.p.value`), multiplied
  by the number of panels (4 Big Two, 10 MFD) and capped at 1.
Either way `p_bonferroni` is p x number of tests (capped at 1; a test counts when both groups have cells)
and `stars` maps it as the authors do: *** < 0.001, ** < 0.01, * < 0.05, else n.s.
"""
from __future__ import annotations

import warnings
from itertools import combinations

import numpy as np
import pandas as pd

from rmjax.analysis.cells import FRAMINGS
from rmjax.errors import DataError

_CHUNK = 2048  # permutations drawn at once; bounds memory at CHUNK x cells
TESTS = ("permutation", "welch")
P_COLUMNS = {"permutation": "p_perm", "welch": "p_welch"}


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


def welch_p_value(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances).

    NaN when a group has fewer than two values or neither group varies (the t statistic is undefined).
    """
    from scipy.stats import ttest_ind

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or len(y) < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return float("nan")
    with warnings.catch_warnings():
        # SciPy flags a group of identical values (a category a model ranks the same on every prompt) as a
        # possible precision loss; its variance is exactly 0 and the test is well defined
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return float(ttest_ind(x, y, equal_var=False).pvalue)


def significance_stars(p: float) -> str:
    """The authors' `p_to_stars`: *** < 0.001, ** < 0.01, * < 0.05, else n.s.; empty for a missing p."""
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def p_column(table: pd.DataFrame) -> str:
    """The column holding a comparison table's unadjusted p-values (`p_perm` or `p_welch`)."""
    return next(c for c in P_COLUMNS.values() if c in table.columns)


def compare_families(cells: pd.DataFrame, permutations: int = 10_000, seed: int = 0,
                     test: str = "permutation") -> pd.DataFrame:
    """One row per (framing, category[, family pair]); see the module docstring for the sign, tests and columns.

    `permutations` and `seed` only matter for the permutation test.
    """
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; choose one of {list(TESTS)}")
    p_name = P_COLUMNS[test]
    families = sorted(cells["family"].unique())
    if len(families) < 2:
        raise DataError(f"comparing families needs at least two, found only {families}; add score files of RMs "
                        "from another base model or fix --families")
    pairs = list(combinations(families, 2))
    framings = [f for f in FRAMINGS if f in set(cells["framing"])]
    categories = list(dict.fromkeys(cells["category"]))
    rows, tests = [], 0
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
                if test == "welch":
                    row[p_name] = welch_p_value(b, a)
                elif len(a) and len(b):
                    values = np.concatenate([a, b])
                    in_second = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
                    rng = np.random.default_rng([seed, test_index])
                    row[p_name] = permutation_p_value(values, in_second, permutations, rng)
                else:
                    row[p_name] = np.nan
                row.update({f"n_{f}": len(by_family[f]) for f in families})
                rows.append(row)
                tests += bool(len(a) and len(b))
    table = pd.DataFrame(rows)
    # every test run counts, also a Welch test without spread (p NaN), as the authors count every panel
    p_bonferroni = np.minimum(1.0, table[p_name] * tests)
    table.insert(table.columns.get_loc(p_name) + 1, "p_bonferroni", p_bonferroni)
    table.insert(table.columns.get_loc("p_bonferroni") + 1, "stars", p_bonferroni.map(significance_stars))
    return table
