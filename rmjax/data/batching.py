"""Records -> token arrays: the one truncation rule, the one bucket ladder, padding and the prompt-tree packer.

Every path that runs a model over records (bulk scoring, training, evaluation) goes through here:

    encode(tokenizer, record, ...)     chat rendering (``rmjax.data.chat``) + the truncation rule -> Encoded
    bucket(n)                          the 1.5x length ladder (few compiled shapes, little padding)
    pad_rows(rows, length, pad, side)  left- or right-padded ids and mask
    packed_batches / build_packed      prompt trees ``[prompt | response 1 | response 2 ...]`` in packed rows

Truncation: a sequence (prompt + its longest response) longer than ``max_length`` loses the oldest
prompt tokens (the responses are kept whole), or the example is dropped (``over_length="drop"``,
or when a response alone does not fit); either is counted by the caller.

A packed tree is one segment of a row; its responses are attention branches (``branch_ids``) that
see the prompt and themselves only, so each response is computed exactly as if it followed the
prompt alone while the prompt's tokens run once. Rows are filled first-fit-decreasing; a tree
longer than the row gets a row of its own (bucketed length). Per row, *slots* number the responses
(sequences) it holds: ``seq_index`` [R, S] is the position of a slot's last token (where rewards
are pooled), ``seq_gate_index`` the gating token of its tree (ArmoRM's gate input: the token that
closes the user turn, ``Encoded.gate`` tokens before the prompt's end; the last prompt token when
``gate`` is 0); ``target_*`` [R, Tt] list the
response tokens with the position that predicts each (for log-probs, only response tokens are
unembedded). Everything is row-local, so rows split over data-parallel devices.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rmjax.data.chat import gate_offset, render
from rmjax.errors import DataError

# a 1.5x ladder: little padding, few compiled shapes; past its end, powers of two
BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def bucket(n: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** np.ceil(np.log2(max(n, 1))))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One example for one model: prompt ids and each response's ids (prompt + response = the
    model's own chat rendering)."""

    prompt: np.ndarray
    responses: tuple[np.ndarray, ...]
    truncated: bool = False
    gate: int = 0  # prompt tokens after the gating token (``rmjax.data.chat.gate_offset``); 0: the last one

    @property
    def tree_length(self) -> int:
        """Tokens of the prompt tree: the prompt once, then every response."""
        return len(self.prompt) + sum(len(r) for r in self.responses)

    @property
    def unshared_tokens(self) -> int:
        """Tokens of scoring every response as a full sequence (the prompt once per response)."""
        return len(self.prompt) * len(self.responses) + sum(len(r) for r in self.responses)


def truncate(prompt: list[int], responses: list[list[int]], max_length: int, over_length: str = "truncate",
             name: str = "") -> tuple[list[int], bool] | str:
    """The one truncation rule: (prompt ids, truncated) or the reason the example is dropped."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt, False
    if over_length == "drop":
        return f"{name}sequence of {len(prompt) + longest} tokens exceeds max_length={max_length} (over_length=drop)"
    if longest >= max_length:
        return (f"{name}response of {longest} tokens leaves no room for the prompt within max_length={max_length} "
                "(the reply is never cut); raise --max-length to score it")
    return prompt[len(prompt) + longest - max_length:], True  # keep the most recent turns


def encode(tokenizer, record, template: str = "model", max_length: int = 1024, over_length: str = "truncate",
           name: str = "", gate: bool = False) -> Encoded | str:
    """The token ids of a record for one model, or the reason (naming the record) it is dropped.
    ``gate``: also locate the gating token (``Encoded.gate``); a truncation that would cut it away
    drops the example."""
    prompt_ids, responses = None, []
    try:
        for response in record.responses:
            p, r = render(tokenizer, record.prompt_messages, response, template)
            prompt_ids = p if prompt_ids is None else prompt_ids
            responses.append(r)
        offset = gate_offset(tokenizer, record.prompt_messages, template) if gate else 0
    except DataError as e:
        raise DataError(f"{record.place or record.id}: {e}") from None
    kept = truncate(prompt_ids, responses, max_length, over_length, name)
    if isinstance(kept, str):
        return f"{record.id}: {kept}"
    if offset >= len(kept[0]):
        return f"{record.id}: {name}truncation to max_length={max_length} cuts away the gating token"
    return Encoded(np.asarray(kept[0], np.int32), tuple(np.asarray(r, np.int32) for r in responses), kept[1],
                   offset)


def encode_sequences(sequences: list[list[int]], max_length: int, over_length: str = "truncate",
                     name: str = "") -> Encoded | str:
    """Token sequences that share a beginning as one tree: their longest common prefix is the
    prompt (at least one token), the rest of each a branch; truncated by the same rule."""
    n = min(len(s) for s in sequences)
    common = next((i for i in range(n) if len({s[i] for s in sequences}) > 1), n)
    common = min(common, n - 1)  # every branch keeps at least one token
    kept = truncate(sequences[0][:common], [s[common:] for s in sequences], max_length, over_length, name)
    if isinstance(kept, str):
        return kept
    return Encoded(np.asarray(kept[0], np.int32), tuple(np.asarray(s[common:], np.int32) for s in sequences),
                   kept[1])


def pad_rows(rows: list, length: int, pad_id: int, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Padded ids and mask [N, length]; ``side`` is where the padding goes."""
    if side not in ("left", "right"):
        raise DataError(f"padding side must be 'left' or 'right', got {side!r}")
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


# ---------------------------------------------------------------- packed prompt trees

@dataclasses.dataclass
class PackedBatch:
    arrays: dict[str, np.ndarray]
    sequences: list[tuple[int, int] | None]  # per flat slot (row * S + slot): (example key, response) or None
    real_tokens: int  # tokens of the trees (prompt once + responses)

    @property
    def padded_tokens(self) -> int:
        return int(self.arrays["input_ids"].size)

    def slot_of(self) -> dict[tuple[int, int], int]:
        return {seq: i for i, seq in enumerate(self.sequences) if seq is not None}


def pack_rows(encoded: dict[int, Encoded], row_length: int, buckets: tuple[int, ...] = BUCKETS
              ) -> list[tuple[int, list[int]]]:
    """(row length, example keys) per row: first-fit decreasing, deterministic (ties by key)."""
    order = sorted(encoded, key=lambda k: (-encoded[k].tree_length, k))
    rows: list[tuple[int, list[int]]] = []
    free: list[int] = []
    for k in order:
        n = encoded[k].tree_length
        if n > row_length:  # too long to share a row: its own, bucketed
            rows.append((bucket(n, buckets), [k]))
            free.append(0)
            continue
        for r, space in enumerate(free):
            if rows[r][0] == row_length and space >= n:
                rows[r][1].append(k)
                free[r] -= n
                break
        else:
            rows.append((row_length, [k]))
            free.append(row_length - n)
    return rows


def packed_batches(encoded: dict[int, Encoded], pad_id: int, *, row_length: int = 512,
                   batch_tokens: int = 4096, buckets: tuple[int, ...] = BUCKETS,
                   ladder: tuple[int, ...] = ()) -> list[PackedBatch]:
    """Packed batches covering every example once; rows of equal length batch together, up to
    ``batch_tokens`` tokens (at least one row), padded to a power-of-two number of rows.

    ``ladder`` (ascending row lengths, the last one ``row_length``) fixes the shapes to a few known in
    advance (``ladder_shapes``), as a server needs: each row takes the shortest length of the ladder
    that holds its trees, with as many slots and targets as tokens; a tree longer than
    ``row_length`` is an error."""
    rows = pack_rows(encoded, row_length, buckets)
    by_length: dict[int, list[list[int]]] = {}
    for length, keys in rows:
        if ladder:
            used = sum(encoded[k].tree_length for k in keys)
            if used > ladder[-1]:
                raise DataError(f"example {keys[0]}: a tree of {used} tokens does not fit the longest row "
                                f"({ladder[-1]} tokens)")
            length = next(n for n in ladder if n >= used)
        by_length.setdefault(length, []).append(keys)
    out = []
    for length in sorted(by_length):
        group = by_length[length]
        per_batch = max(1, batch_tokens // length)
        for start in range(0, len(group), per_batch):
            chunk = group[start:start + per_batch]
            if ladder:
                out.append(build_packed(encoded, chunk, length, pad_id, n_rows=bucket(len(chunk), ROW_COUNTS),
                                        slots=length, targets=length))
            else:
                out.append(build_packed(encoded, chunk, length, pad_id, n_rows=1 << (len(chunk) - 1).bit_length(),
                                        buckets=buckets))
    return out


# row counts of fixed-shape batches: a 1.5x ladder, so a batch pads at most a third of its rows
ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def ladder_shapes(ladder: tuple[int, ...], batch_tokens: int) -> list[tuple[int, int]]:
    """Every (rows, row length) ``packed_batches(..., ladder=ladder)`` can produce."""
    out = []
    for length in ladder:
        most = bucket(max(1, batch_tokens // length), ROW_COUNTS)
        out += [(n, length) for n in ROW_COUNTS if n <= most]
    return out


def build_packed(encoded: dict[int, Encoded], rows: list[list[int]], length: int, pad_id: int, *,
                 n_rows: int | None = None, slots: int | None = None, targets: int | None = None,
                 buckets: tuple[int, ...] = BUCKETS) -> PackedBatch:
    """Arrays for ``rows`` (example keys per row) of ``length`` tokens. ``n_rows`` (>= len(rows)),
    ``slots`` (sequences per row) and ``targets`` (response tokens per row) fix the shapes; by
    default they are the batch's own (slots and targets bucketed)."""
    for keys in rows:
        for k in keys:
            if len(encoded[k].prompt) == 0:
                raise DataError(f"example {k}: empty prompt; the first response token has nothing to condition on")
            if encoded[k].tree_length > length:
                raise DataError(f"example {k}: a tree of {encoded[k].tree_length} tokens does not fit a row of "
                                f"{length}")
    n_rows = len(rows) if n_rows is None else n_rows
    need_s = max(sum(len(encoded[k].responses) for k in keys) for keys in rows)
    need_t = max(sum(len(r) for k in keys for r in encoded[k].responses) for keys in rows)
    n_s = bucket(need_s, (1, 2, 4, 8) + buckets) if slots is None else slots
    n_t = bucket(need_t, buckets) if targets is None else targets
    if n_rows < len(rows) or n_s < need_s or n_t < need_t:
        raise DataError(f"packed shapes too small: rows {n_rows}/{len(rows)}, slots {n_s}/{need_s}, "
                        f"targets {n_t}/{need_t}")
    ids = np.full((n_rows, length), pad_id, np.int32)
    seg, branch, pos = (np.zeros((n_rows, length), np.int32) for _ in range(3))
    seq_index, seq_gate, seq_valid = (np.zeros((n_rows, n_s), np.int32) for _ in range(3))
    t_index, t_ids, t_valid = (np.zeros((n_rows, n_t), np.int32) for _ in range(3))
    t_slot = np.full((n_rows, n_t), n_s - 1, np.int32)
    sequences: list[tuple[int, int] | None] = [None] * (n_rows * n_s)
    real = 0
    for r, keys in enumerate(rows):
        at, slot, t = 0, 0, 0
        for s, k in enumerate(keys):
            e = encoded[k]
            p = len(e.prompt)
            ids[r, at:at + p], seg[r, at:at + p], pos[r, at:at + p] = e.prompt, s + 1, np.arange(p)
            prompt_last = at + p - 1
            at += p
            for j, resp in enumerate(e.responses):
                n = len(resp)
                span = slice(at, at + n)
                ids[r, span], seg[r, span], branch[r, span], pos[r, span] = resp, s + 1, j + 1, p + np.arange(n)
                t_index[r, t:t + n] = np.concatenate([[prompt_last], np.arange(at, at + n - 1)])
                t_ids[r, t:t + n], t_slot[r, t:t + n], t_valid[r, t:t + n] = resp, slot, 1
                seq_index[r, slot], seq_gate[r, slot], seq_valid[r, slot] = at + n - 1, prompt_last - e.gate, 1
                sequences[r * n_s + slot] = (k, j)
                at, slot, t = at + n, slot + 1, t + n
            real += e.tree_length
    arrays = {"input_ids": ids, "segment_ids": seg, "branch_ids": branch, "positions": pos,
              "seq_index": seq_index, "seq_gate_index": seq_gate, "seq_valid": seq_valid,
              "target_index": t_index, "target_ids": t_ids, "target_slot": t_slot, "target_valid": t_valid}
    return PackedBatch(arrays, sequences, real)


def unpack(batch: PackedBatch, stats: dict) -> dict[int, dict[str, np.ndarray]]:
    """Per example key of the batch: {'sum', 'mean', 'count'[, 'rm']} arrays over its responses
    (per-slot stats [R, S] or [R, S, K]), and 'tokens' [R_e, longest] (per-token log-probs,
    zero-padded) when the stats carry them ([R, Tt])."""
    stats = {k: np.asarray(v) for k, v in stats.items()}
    n_rows, n_s = batch.arrays["seq_index"].shape
    n_responses: dict[int, int] = {}
    for seq in batch.sequences:
        if seq is not None:
            n_responses[seq[0]] = max(n_responses.get(seq[0], 0), seq[1] + 1)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, n in n_responses.items():
        out[key] = {name: np.zeros((n, *v.shape[2:]), np.float32) for name, v in stats.items() if name != "tokens"}
    for flat, seq in enumerate(batch.sequences):
        if seq is None:
            continue
        for name, values in stats.items():
            if name != "tokens":
                out[seq[0]][name][seq[1]] = values.reshape(n_rows * n_s, *values.shape[2:])[flat]
    if "tokens" in stats:
        a = batch.arrays
        per_slot: dict[int, list[np.ndarray]] = {}
        for r in range(n_rows):
            valid = a["target_valid"][r] > 0
            for s in np.unique(a["target_slot"][r][valid]):
                per_slot[r * n_s + int(s)] = stats["tokens"][r][valid & (a["target_slot"][r] == s)]
        width: dict[int, int] = {}
        for flat, lp in per_slot.items():
            key = batch.sequences[flat][0]
            width[key] = max(width.get(key, 0), len(lp))
        for key, n in n_responses.items():
            out[key]["tokens"] = np.zeros((n, width[key]), np.float32)
        for flat, lp in per_slot.items():
            key, j = batch.sequences[flat]
            out[key]["tokens"][j, :len(lp)] = lp
    return out
