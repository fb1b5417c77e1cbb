"""How alike two RMs order the same words: Kendall tau-b, Spearman rho and rank-biased overlap (RBO).

Each measure is computed per prompt between every pair of models, then averaged over prompts.
"""
from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, rankdata

from rmjax.analysis.notes import warn
from rmjax.analysis.scores import ScoreSet

METRICS = ("kendall_tau", "spearman", "rbo")


def rank_biased_overlap(ranking_a: Sequence[Hashable], ranking_b: Sequence[Hashable], p: float = 0.9) -> float:
    """Extrapolated RBO (Webber, Moffat & Zobel 2010, eq. 32) of two rankings of equal length, best first.

    RBO_ext = (1 - p) / p * sum_{d=1..k} A_d p^d + A_k p^k, with A_d the fraction of items shared by the
    two depth-d prefixes. 1 for identical rankings, 0 for disjoint ones.
    """
    if len(ranking_a) != len(ranking_b):
        raise ValueError(f"rankings must have equal length, got {len(ranking_a)} and {len(ranking_b)}")
    for name, ranking in (("ranking_a", ranking_a), ("ranking_b", ranking_b)):
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"{name} repeats an item")
    position_b = {item: i for i, item in enumerate(ranking_b)}
    shared_depth = np.array([max(i, position_b[item]) for i, item in enumerate(ranking_a) if item in position_b],
                            dtype=np.int64)
    return _extrapolated_rbo(shared_depth, len(ranking_a), p)


def _extrapolated_rbo(shared_depth: np.ndarray, k: int, p: float) -> float:
    """RBO_ext from, for each shared item, the 0-based depth from which both prefixes hold it."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if k == 0:
        return float("nan")
    overlap = np.cumsum(np.bincount(shared_depth, minlength=k)[:k])  # X_d for d = 1..k
    depths = np.arange(1, k + 1)
    agreement = overlap / depths
    return float((1 - p) / p * np.sum(agreement * p ** depths) + agreement[-1] * p ** k)


def model_similarity(scores: ScoreSet, words: list[str], families: Mapping[str, str], p: float = 0.9
                     ) -> pd.DataFrame:
    """model_a, model_b, family_a, family_b, kendall_tau, spearman, rbo, n_prompts for every pair of models.

    RBO orders words by score, highest first; equal scores are ordered by the word so the result is
    deterministic.
    """
    models = scores.models
    word_order = np.arange(len(words))
    matrices = {m: scores.tables[m].loc[words, scores.prompts].to_numpy(float) for m in models}
    average_ranks = {m: rankdata(matrices[m], axis=0) for m in models}
    positions = {}
    for m in models:
        pos = np.empty_like(matrices[m], dtype=np.int64)
        for j in range(len(scores.prompts)):
            order = np.lexsort((word_order, -matrices[m][:, j]))
            pos[order, j] = word_order
        positions[m] = pos
    rows, undefined = [], 0
    for a, b in combinations(models, 2):
        taus, rhos, rbos = [], [], []
        for j in range(len(scores.prompts)):
            x, y = matrices[a][:, j], matrices[b][:, j]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant column gives nan, counted below
                taus.append(kendalltau(x, y).statistic)
                rhos.append(np.corrcoef(average_ranks[a][:, j], average_ranks[b][:, j])[0, 1])
            rbos.append(_extrapolated_rbo(np.maximum(positions[a][:, j], positions[b][:, j]), len(words), p))
        undefined += int(np.isnan(taus).sum())
        rows.append({"model_a": a, "model_b": b, "family_a": families[a], "family_b": families[b],
                     "kendall_tau": np.nanmean(taus) if not np.all(np.isnan(taus)) else np.nan,
                     "spearman": np.nanmean(rhos) if not np.all(np.isnan(rhos)) else np.nan,
                     "rbo": float(np.mean(rbos)), "n_prompts": len(scores.prompts)})
    if undefined:
        warn(f"{undefined} (model pair, prompt) correlations are undefined because one model gives every word "
             "the same score; they are left out of the averages")
    return pd.DataFrame(rows, columns=["model_a", "model_b", "family_a", "family_b", *METRICS, "n_prompts"])


def similarity_matrix(similarity: pd.DataFrame, metric: str, models: Sequence[str]) -> pd.DataFrame:
    """Square, symmetric table of one metric; the diagonal is 1 (a model against itself)."""
    matrix = pd.DataFrame(np.eye(len(models)), index=list(models), columns=list(models))
    for row in similarity.itertuples(index=False):
        value = getattr(row, metric)
        matrix.loc[row.model_a, row.model_b] = matrix.loc[row.model_b, row.model_a] = value
    return matrix


def classical_mds(distances: np.ndarray, dimensions: int = 2) -> np.ndarray:
    """Torgerson scaling: coordinates whose Euclidean distances best match `distances` (n x n, symmetric)."""
    d = np.asarray(distances, float)
    n = len(d)
    centering = np.eye(n) - np.ones((n, n)) / n
    gram = -0.5 * centering @ (d ** 2) @ centering
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    top = np.argsort(eigenvalues)[::-1][:dimensions]
    coordinates = eigenvectors[:, top] * np.sqrt(np.clip(eigenvalues[top], 0, None))
    # fix each axis' sign so the output does not flip between runs or platforms
    signs = np.sign(coordinates[np.argmax(np.abs(coordinates), axis=0), np.arange(coordinates.shape[1])])
    coordinates = coordinates * np.where(signs == 0, 1, signs)
    if coordinates.shape[1] < dimensions:
        coordinates = np.pad(coordinates, ((0, 0), (0, dimensions - coordinates.shape[1])))
    return coordinates


def mds_map(similarity: pd.DataFrame, models: Sequence[str], families: Mapping[str, str],
            metric: str = "kendall_tau") -> pd.DataFrame:
    """model, family, x, y from classical MDS of the distance 1 - mean similarity."""
    distances = 1 - similarity_matrix(similarity, metric, models).to_numpy()
    coordinates = classical_mds(np.nan_to_num(distances, nan=1.0))
    return pd.DataFrame({"model": list(models), "family": [families[m] for m in models],
                         "x": coordinates[:, 0], "y": coordinates[:, 1]})
