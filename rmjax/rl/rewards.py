"""Rewards for RL: a known token-utility reward (controlled studies: the induced preference is known
exactly) and any rmjax reward model over the decoded text (its own tokenizer and template)."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from rmjax.data.records import Record
from rmjax.errors import ConfigError
from rmjax.scoring import bulk


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


def rm_reward(rm_loaded, prompts, decode: Callable, settings=None) -> Callable:
    """reward(sample) = an rmjax reward model's score of the decoded reply to its prompt: the RM
    renders (prompt messages, reply text) with its own tokenizer and chat template and runs the one
    scoring path (``rmjax.scoring.bulk``: the K replies of a prompt as one packed prompt tree), so
    the RM's tokenizer may differ from the policy's. ``prompts[i]``: prompt i's messages
    [{"role", "content"}]; ``decode(samples)`` -> reply texts (``rloo.samples_text``). A sample the
    RM cannot score (too long with ``over_length='drop'``) gets NaN, so its batch is skipped."""

    scorer = bulk.Scorer([bulk.ModelSlot("rm", rm_loaded)], settings or bulk.ScoreSettings())

    def reward(prompt_indices, samples) -> np.ndarray:
        texts = decode(samples)
        groups: dict[int, list[int]] = {}
        for pos, i in enumerate(np.asarray(prompt_indices).tolist()):
            groups.setdefault(int(i), []).append(pos)
        records = []
        for j, (i, positions) in enumerate(groups.items()):
            kind = {1: "single", 2: "pair"}.get(len(positions), "best_of_n")
            turns = tuple((m["role"], m["content"]) for m in prompts[i])
            records.append(Record(f"prompt{i}", turns, tuple(texts[p] or " " for p in positions), kind, j))
        rows, _, _ = scorer.score_shard(records)
        out = np.full(len(texts), np.nan, np.float32)
        by_index = {row["index"]: row for row in rows}
        for rec, positions in zip(records, groups.values()):
            row = by_index.get(rec.index)
            if row is not None:
                for name, p in zip(rec.response_names, positions):
                    out[p] = row[f"rm_{name}"]
        return out

    return reward
