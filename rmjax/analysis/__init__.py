"""Value-bias analysis of reward models: which dictionary words RMs of each base-model family prefer.

Typical use: `run_value_bias(scores_dir, "big2_nouns", out_dir)`, or step by step
`load_scores` -> `load_dictionary` -> `assign_families` -> `analysis_words` -> `ranked_words` -> `rank_words`
-> `compute_cells` -> `compare_families` / `fit_mixed_model`; `model_similarity`, `extreme_words`,
`frequency_bias` describe the models further.

Names are imported on first use so that `rmjax` subcommands which do not analyse anything start without
loading SciPy and statsmodels.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "analysis_words": "cells", "compute_cells": "cells", "rank_words": "cells", "ranked_words": "cells",
    "cohens_d": "comparison", "compare_families": "comparison", "permutation_p_value": "comparison",
    "welch_p_value": "comparison",
    "BUNDLED_DICTIONARIES": "dictionary", "Dictionary": "dictionary", "load_dictionary": "dictionary",
    "extreme_words": "extremes",
    "assign_families": "families", "infer_family": "families", "load_family_file": "families",
    "frequency_bias": "frequency",
    "fit_mixed_model": "mixed",
    "ValueBiasWarning": "notes",
    "ValueBiasResult": "pipeline", "run_value_bias": "pipeline",
    "ScoreSet": "scores", "load_scores": "scores", "prompt_framing": "scores", "read_score_file": "scores",
    "classical_mds": "similarity", "model_similarity": "similarity", "rank_biased_overlap": "similarity",
}
__all__ = [
    "BUNDLED_DICTIONARIES",
    "Dictionary",
    "ScoreSet",
    "ValueBiasResult",
    "ValueBiasWarning",
    "analysis_words",
    "assign_families",
    "classical_mds",
    "cohens_d",
    "compare_families",
    "compute_cells",
    "extreme_words",
    "fit_mixed_model",
    "frequency_bias",
    "infer_family",
    "load_dictionary",
    "load_family_file",
    "load_scores",
    "model_similarity",
    "permutation_p_value",
    "prompt_framing",
    "rank_biased_overlap",
    "rank_words",
    "ranked_words",
    "read_score_file",
    "run_value_bias",
    "welch_p_value",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rmjax.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rmjax.analysis.{_EXPORTS[name]}"), name)
