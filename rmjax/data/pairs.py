"""Preference pairs -> token arrays: chat rendering, length policy, bucketing, a resumable batch plan.

Every chosen/rejected text is rendered by the model's own chat template (prompt turns + the reply
as an assistant turn) and tokenised. Over-long examples are truncated from the left (the oldest
prompt turns go first; the reply is kept whole) or dropped, and counted either way.

Batches come from a *plan*: a deterministic list, fixed by the seed, of (pair indices, bucket
length) per step. The data-iterator state is just the step number, so a resumed run sees exactly
the batches an uninterrupted run would, and each process takes its own slice of every batch.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rmjax.data.chat import render
from rmjax.data.preferences import PreferencePair
from rmjax.errors import DataError


@dataclasses.dataclass
class TokenizedPairs:
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    pairs: list[PreferencePair]
    truncated: int = 0
    dropped: list[str] = dataclasses.field(default_factory=list)  # "id: reason"

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        return (f"{len(self)} pairs tokenised, {self.truncated} truncated, {len(self.dropped)} dropped"
                + (f" (first: {self.dropped[0]})" if self.dropped else ""))


def render_ids(tokenizer, pair: PreferencePair, response: str, template: str = "model") -> tuple[list[int], int]:
    """Token ids of prompt + response (see ``rmjax.data.chat.render``) and the prompt's token count."""
    prompt_ids, response_ids = render(tokenizer, pair.prompt_messages, response, template)
    return prompt_ids + response_ids, len(prompt_ids)


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, over_length: str = "truncate"
                   ) -> TokenizedPairs:
    out = TokenizedPairs([], [], [])
    for pair in pairs:
        if not pair.chosen.strip() or not pair.rejected.strip():
            out.dropped.append(f"{pair.id}: empty response")
            continue
        if pair.chosen == pair.rejected:
            out.dropped.append(f"{pair.id}: chosen and rejected are identical")
            continue
        sides, cut = [], False
        for response in (pair.chosen, pair.rejected):
            ids, n_prompt = render_ids(tokenizer, pair, response)
            if len(ids) > max_length:
                if over_length == "drop" or len(ids) - n_prompt > max_length - 1:
                    sides = None
                    break
                ids = ids[len(ids) - max_length:]  # keep the reply and the most recent prompt turns
                cut = True
            sides.append(np.asarray(ids, np.int32))
        if sides is None:
            out.dropped.append(f"{pair.id}: longer than max_length={max_length} ({over_length})")
            continue
        out.truncated += cut
        out.chosen.append(sides[0])
        out.rejected.append(sides[1])
        out.pairs.append(pair)
    return out


def bucket_of(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise DataError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def batch_plan(data: TokenizedPairs, batch_size: int, steps: int, buckets: tuple[int, ...], seed: int
               ) -> list[tuple[np.ndarray, int]]:
    """[(pair indices [batch_size], padded length)] for each step; epochs reshuffle with seed+epoch.

    Pairs are grouped by bucket within each shuffled epoch so padding stays small while the order
    stays random; a bucket's leftover pairs carry over to the next epoch.
    """
    if len(data) < batch_size:
        raise DataError(f"only {len(data)} training pairs for a batch of {batch_size}; lower train.batch_size")
    lengths = [max(len(c), len(r)) for c, r in zip(data.chosen, data.rejected)]
    bucket = np.array([bucket_of(n, buckets) for n in lengths])
    plan: list[tuple[np.ndarray, int]] = []
    pending: dict[int, list[int]] = {b: [] for b in buckets}
    epoch = 0
    while len(plan) < steps:
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        for i in order:
            b = int(bucket[i])
            pending[b].append(int(i))
            if len(pending[b]) == batch_size:
                plan.append((np.asarray(pending[b]), b))
                pending[b] = []
                if len(plan) == steps:
                    break
        epoch += 1
    return plan


def pad_rows(rows: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and mask [N, length]."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def make_batch(data: TokenizedPairs, indices: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
    c_ids, c_mask = pad_rows([data.chosen[i] for i in indices], length, pad_id)
    r_ids, r_mask = pad_rows([data.rejected[i] for i in indices], length, pad_id)
    return {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask}


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's share of a global batch (contiguous, so global order is preserved)."""
    if len(indices) % process_count:
        raise DataError(f"batch of {len(indices)} does not split over {process_count} processes")
    per = len(indices) // process_count
    return indices[process_index * per:(process_index + 1) * per]
