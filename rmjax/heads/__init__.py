"""Reward-model heads: Flax Linen modules applied through pure ``init`` / ``apply``."""
from rmjax.heads.armorm import ArmoRMGatingHead, ArmoRMHead, ArmoRMOutput, debias_rewards, verbosity_transform_matrix
from rmjax.heads.judge import GenerativeJudgeHead, JudgeOutput, judge_preference, label_logits
from rmjax.heads.probe import (L2_GRID, LinearProbe, LogisticSelection, RidgeSelection, logistic_select,
                               pairwise_logistic_fit, probe_params, ridge_fit, ridge_predict, ridge_select,
                               select_layer)
from rmjax.heads.scalar import MultiObjectiveHead, ScalarHead, linear_params_from_torch

__all__ = [
    "ArmoRMGatingHead", "ArmoRMHead", "ArmoRMOutput", "GenerativeJudgeHead", "JudgeOutput", "L2_GRID", "LinearProbe",
    "MultiObjectiveHead", "ScalarHead", "debias_rewards", "judge_preference", "label_logits",
    "LogisticSelection", "RidgeSelection", "linear_params_from_torch", "logistic_select", "pairwise_logistic_fit", "probe_params", "ridge_fit",
    "ridge_predict", "ridge_select", "select_layer", "verbosity_transform_matrix",
]
