"""Matching two SAE dictionaries (base vs tuned model) by the cosine of their decoder directions.

    match_dictionaries(base, tuned, shared=0.9, lo=0.5) -> one row per feature of either dictionary

For each feature, its best match in the other dictionary (highest signed cosine of decoder rows:
a ReLU feature and its negation are different features) and its partner in a one-to-one matching
(``scipy.optimize.linear_sum_assignment`` maximising the summed cosine; features left over when
the dictionaries differ in size have none). ``status`` classifies each feature by the cosine of
its best match (or of its one-to-one partner with ``by="assignment"``):

    shared      cos >= shared                     the same direction in both models
    moved       lo <= cos < shared                a related direction that turned
    vanished    cos < lo (a base feature)         no counterpart in the tuned model
    new         cos < lo (a tuned feature)        no counterpart in the base model

The cosine matrix is [F_base, F_tuned] in memory; the one-to-one matching costs O(F^3) time
(seconds for a few thousand features; pass ``one_to_one=False`` for larger dictionaries).

``top_activations`` lists a feature's strongest activations with their example, position and
token, to read the contexts a feature responds to.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from rmjax.errors import ConfigError, DataError
from rmjax.sae.model import decoder

STATUSES = ("shared", "moved", "vanished", "new")


def _directions(dictionary, name: str) -> np.ndarray:
    """Unit decoder rows [F, D] of SAE params or of a decoder matrix."""
    if isinstance(dictionary, dict):
        dictionary = decoder(dictionary)
    w = np.asarray(dictionary, np.float64)
    if w.ndim != 2 or not w.size:
        raise DataError(f"the {name} dictionary must be SAE params or a decoder matrix [features, width], "
                        f"got shape {w.shape}")
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def cosine_matrix(base, tuned) -> np.ndarray:
    """[F_base, F_tuned] cosines of the decoder directions."""
    a, b = _directions(base, "base"), _directions(tuned, "tuned")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"the dictionaries have widths {a.shape[1]} (base) and {b.shape[1]} (tuned); match SAEs "
                        "trained on the same layer of models of one width")
    return a @ b.T


def match_dictionaries(base, tuned, shared: float = 0.9, lo: float = 0.5, one_to_one: bool = True,
                       by: str = "best"):
    """A DataFrame, one row per feature: dictionary ("base" | "tuned"), feature, best_match,
    best_cos, assigned (the one-to-one partner, -1 if none or ``one_to_one=False``), assigned_cos
    (NaN without a partner), status (module docstring)."""
    import pandas as pd

    if not -1 <= lo <= shared <= 1:
        raise ConfigError(f"need -1 <= lo <= shared <= 1, got lo={lo}, shared={shared}")
    if by not in ("best", "assignment") or (by == "assignment" and not one_to_one):
        raise ConfigError(f"by must be 'best' or 'assignment' (which needs one_to_one=True), got by={by!r}")
    cos = cosine_matrix(base, tuned)
    n_base, n_tuned = cos.shape
    partner = {"base": np.full(n_base, -1), "tuned": np.full(n_tuned, -1)}
    if one_to_one:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cos, maximize=True)
        partner["base"][rows], partner["tuned"][cols] = cols, rows
    tables = []
    for name, c, lost in (("base", cos, "vanished"), ("tuned", cos.T, "new")):
        best = np.argmax(c, axis=1)
        best_cos = c[np.arange(len(c)), best]
        assigned = partner[name]
        assigned_cos = np.where(assigned >= 0, c[np.arange(len(c)), np.maximum(assigned, 0)], np.nan)
        score = best_cos if by == "best" else np.nan_to_num(assigned_cos, nan=-np.inf)
        status = np.where(score >= shared, "shared", np.where(score >= lo, "moved", lost))
        tables.append(pd.DataFrame({"dictionary": name, "feature": np.arange(len(c)), "best_match": best,
                                    "best_cos": best_cos, "assigned": assigned, "assigned_cos": assigned_cos,
                                    "status": status}))
    return pd.concat(tables, ignore_index=True)


def top_activations(codes, token_ids, example_index, feature: int | None = None, k: int = 10, *,
                    positions=None, decode: Callable[[int], str] | None = None):
    """The ``k`` rows where ``feature`` is largest, strongest first: a DataFrame with row, example,
    position (if ``positions`` are given), token, text (with ``decode``, e.g. a tokenizer's
    ``decode([id])``) and activation. ``codes``: [N, F] (pick ``feature``) or one feature's
    activations [N]; token_ids, example_index and positions: [N] per row, as in
    ``ActivationCache.positions()``. Rows where the feature is 0 are left out."""
    import pandas as pd

    a = np.asarray(codes)
    if a.ndim == 2:
        if feature is None or not 0 <= feature < a.shape[1]:
            raise ConfigError(f"feature must be in 0..{a.shape[1] - 1} for codes [N, F], got {feature!r}")
        a = a[:, feature]
    elif a.ndim != 1:
        raise DataError(f"codes must be [rows, features] or one feature's [rows], got shape {a.shape}")
    columns = {"token": token_ids, "example": example_index, "position": positions}
    for name, v in columns.items():
        if v is not None and np.shape(v) != a.shape:
            raise DataError(f"{name} must have one entry per row ({a.shape[0]}), got shape {np.shape(v)}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    order = np.argsort(-a, kind="stable")[:k]
    order = order[a[order] > 0]
    out = {"row": order, "example": np.asarray(example_index)[order]}
    if positions is not None:
        out["position"] = np.asarray(positions)[order]
    out["token"] = np.asarray(token_ids)[order]
    if decode is not None:
        out["text"] = [decode(int(t)) for t in out["token"]]
    out["activation"] = a[order]
    return pd.DataFrame(out)
