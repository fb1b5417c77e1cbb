"""Reward-model heads: Flax Linen modules applied through pure ``init`` / ``apply``."""
from rmjax.heads.armorm import (
    ArmoRMGatingHead,
    ArmoRMHead,
    ArmoRMOutput,
    debias_rewards,
    verbosity_transform_matrix,
)
from rmjax.heads.judge import (
    GenerativeJudgeHead,
    JudgeOutput,
    judge_preference,
    label_logits,
)
from rmjax.heads.probe import LinearProbe, probe_params, select_layer
from rmjax.heads.scalar import MultiObjectiveHead, ScalarHead, linear_params_from_torch

__all__ = [
    "ArmoRMGatingHead", "ArmoRMHead", "ArmoRMOutput", "GenerativeJudgeHead", "JudgeOutput", "LinearProbe",
    "MultiObjectiveHead", "ScalarHead", "debias_rewards", "judge_preference", "label_logits",
    "linear_params_from_torch", "probe_params", "select_layer", "verbosity_transform_matrix",
]
