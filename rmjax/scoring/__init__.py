"""Scoring with a language model's own probabilities: per-token and per-sequence log-probs."""
from rmjax.scoring.logprobs import (
                                    TokenStats,
                                    implicit_reward,
                                    next_token_logprobs,
                                    response_mask,
                                    segment_sums,
                                    sequence_logprobs,
                                    shift_for_next_token,
                                    token_logprobs,
)

__all__ = ["TokenStats", "implicit_reward", "next_token_logprobs", "response_mask", "segment_sums",
           "sequence_logprobs", "shift_for_next_token", "token_logprobs"]
