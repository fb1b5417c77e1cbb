"""Rewards for RL: a known token-utility reward (controlled studies: the induced preference is known
exactly) and any rmjax reward model over the decoded text (its own tokenizer and template)."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from rmjax.errors import ConfigError


def utility_token_ids(tokenizer, words: Iterable[str]) -> np.ndarray:
    """Ids of the vocabulary tokens that spell one of ``words`` (case and surrounding space
    ignored): a word the tokenizer splits into several tokens has no utility token and is reported."""
    wanted = {w.strip().lower() for w in words if w.strip()}
    ids = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).strip().lower() in wanted]
    if not ids:
        raise ConfigError(f"none of the {len(wanted)} utility words is a single token of {tokenizer.source}; "
                          "give words the tokenizer keeps whole")
    return np.asarray(sorted(ids), np.int32)


def token_utility(ids: np.ndarray, per_token: float = 1.0, cap: int | None = None) -> Callable:
    """reward(sample) = per_token * (number of generated tokens that are utility tokens), at most
    ``cap`` of them: a reward whose optimum is known (say the utility words)."""
    table = np.asarray(ids, np.int64)

    def reward(prompt_indices, samples) -> np.ndarray:
        hits = np.isin(np.asarray(samples.tokens), table) & np.asarray(samples.valid)
        count = hits.sum(axis=1)
        if cap is not None:
            count = np.minimum(count, cap)
        return per_token * count.astype(np.float32)

    return reward


def text_reward(score_texts: Callable, decode: Callable) -> Callable:
    """reward(sample) = ``score_texts(prompt_indices, texts)``, texts the decoded completions: a
    reward model with its own tokenizer and chat template scores the text, never the policy's ids."""
    def reward(prompt_indices, samples) -> np.ndarray:
        return np.asarray(score_texts(prompt_indices, decode(samples)), np.float32)

    return reward
