"""Mixed-effects model of the cells: median_rank ~ family * category * framing, random intercept per model.

Reference levels: the alphabetically first family and category, and positive framing; fitted by REML.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from rmjax.analysis.cells import FRAMINGS
from rmjax.analysis.notes import warn

COLUMNS = ["term", "estimate", "std_error", "z", "p_value", "ci_low", "ci_high"]


def fit_mixed_model(cells: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, object]]:
    """Fixed-effect coefficients, then `Group Var` (variance of the per-model intercepts) and `Residual Var`;
    and facts about the fit."""
    data = cells[["model", "family", "category", "framing", "median_rank"]].copy()
    data["family"] = pd.Categorical(data["family"], sorted(data["family"].unique()))
    data["category"] = pd.Categorical(data["category"], sorted(data["category"].unique()))
    data["framing"] = pd.Categorical(data["framing"], [f for f in FRAMINGS if f in set(data["framing"])])
    # a factor with one level has no contrast to estimate
    factors = [f for f in ("family", "category", "framing") if len(data[f].cat.categories) > 1]
    formula = "median_rank ~ " + (" * ".join(factors) if factors else "1")
    facts: dict[str, object] = {"formula": formula + " + (1 | model)", "n_obs": len(data),
                                "n_models": int(data["model"].nunique()), "method": "REML"}
    if data["model"].nunique() < 2:
        warn("the mixed model needs at least two models for a random intercept; it was not fitted")
        return pd.DataFrame(columns=COLUMNS), {**facts, "converged": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = smf.mixedlm(formula, data, groups=data["model"]).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as e:
            warn(f"the mixed model could not be fitted ({e}); mixed_model.csv is empty")
            return pd.DataFrame(columns=COLUMNS), {**facts, "converged": False}
    for w in caught:
        if issubclass(w.category, (ConvergenceWarning, RuntimeWarning, UserWarning)):
            warn(f"mixed model: {w.message}")
    fixed = result.fe_params.index
    ci = result.conf_int().reindex(fixed)
    table = pd.DataFrame({
        "term": fixed,
        "estimate": result.fe_params.to_numpy(),
        "std_error": result.bse_fe.reindex(fixed).to_numpy(),
        "z": result.tvalues.reindex(fixed).to_numpy(),
        "p_value": result.pvalues.reindex(fixed).to_numpy(),
        "ci_low": ci[0].to_numpy(),
        "ci_high": ci[1].to_numpy(),
    })
    # variance components on the scale of median_rank (statsmodels' params hold them divided by the residual)
    variances = pd.DataFrame({"term": ["Group Var", "Residual Var"],
                              "estimate": [float(result.cov_re.iloc[0, 0]), float(result.scale)]})
    table = pd.concat([table, variances.reindex(columns=COLUMNS)], ignore_index=True)
    facts.update(converged=bool(result.converged), residual_variance=float(result.scale),
                 log_likelihood=float(result.llf))
    return table, facts
