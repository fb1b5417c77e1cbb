"""Training and evaluation batches: a resumable plan of examples per step, and their arrays.

The *plan* is a deterministic list, fixed by the seed, of example indices per step (shuffled per
epoch, grouped by length bucket so that padded batches stay small). The data-iterator state is
just the step number, so a resumed run sees exactly the batches an uninterrupted run would; each
process builds its own contiguous slice of every micro-batch.

Arrays of one micro-batch (every head reads the same schema; ``rmjax.train.objectives``):
    packed (train.pack, the default): prompt trees in rows of at most ``pack_length`` tokens (per
        step, the ladder length that computes the fewest tokens) —
        input_ids, segment_ids, branch_ids, positions [R, L]  (``rmjax.data.batching.build_packed``)
    unpacked: every response a row of its own, prompt + response, padded ([2b, T] for pairs) —
        input_ids, attention_mask [R, T]
    both: seq_index / seq_gate_index / seq_valid [R, S] (slots: S = 1 unpacked), and per head
        pairs:    pair_a, pair_b (flat slot indices), pair_margin, pair_weight [P]
        ratings:  seq_targets, seq_target_mask [R * S, K]
        judge:    seq_label [R * S]
        lm:       (no labels: the reply tokens are the targets)
        dpo, lm:  target_index / target_ids / target_slot / target_valid [R, Tt]
Shapes are bucketed (rows in multiples of the data-parallel devices), so few shapes compile.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from rmjax.data import batching
from rmjax.data.batching import BUCKETS, bucket
from rmjax.errors import DataError

# rows per batch (in multiples of the data-parallel devices): every count to 8, then ~1.25x steps
ROW_LADDER = (*range(1, 9), 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MODEL_KEYS = {True: ("input_ids", "segment_ids", "branch_ids", "positions"), False: ("input_ids", "attention_mask")}
LABEL_KEYS = {"pairs": ("pair_a", "pair_b", "pair_margin", "pair_weight"),
              "ratings": ("seq_targets", "seq_target_mask"), "judge": ("seq_label",), "lm": ()}
SLOT_KEYS = ("seq_index", "seq_gate_index", "seq_valid")
TARGET_KEYS = ("target_index", "target_ids", "target_slot", "target_valid")


@dataclasses.dataclass(frozen=True)
class Layout:
    packed: bool
    trees: str  # pairs | ratings | judge | lm
    targets: bool  # response-token targets (dpo)
    pad_id: int
    pack_length: int
    row_multiple: int = 1  # rows per (local) batch: a multiple of this (the data-parallel devices)
    side: str = "right"  # unpacked padding side
    num_objectives: int = 0

    @property
    def keys(self) -> tuple[str, ...]:
        return MODEL_KEYS[self.packed] + SLOT_KEYS + LABEL_KEYS[self.trees] + (TARGET_KEYS if self.targets else ())


def planned_steps(train, n_examples: int) -> int:
    """Optimizer steps of a run: ``train.steps``, or with ``train.epochs`` > 0 enough steps for every
    one of the ``n_examples`` training examples to be seen ``epochs`` times (at least one step)."""
    if train.epochs <= 0:
        return train.steps
    return max(1, math.ceil(train.epochs * n_examples / train.batch_size))


def plan(examples: list, batch_size: int, steps: int, seed: int, max_length: int) -> list[np.ndarray]:
    """Example indices [batch_size] per step; epochs reshuffle with (seed, epoch). Examples are
    grouped by length bucket within each shuffled epoch; a bucket's leftovers carry over."""
    if len(examples) < batch_size:
        raise DataError(f"only {len(examples)} training examples for a batch of {batch_size}; "
                        "lower train.batch_size or add data")
    group = np.array([bucket(min(max(len(e.tree.prompt) + len(r) for r in e.tree.responses), 2 * max_length))
                      for e in examples])
    out: list[np.ndarray] = []
    pending: dict[int, list[int]] = {}
    epoch = 0
    while len(out) < steps:
        for i in np.random.default_rng([seed, epoch]).permutation(len(examples)):
            g = pending.setdefault(int(group[i]), [])
            g.append(int(i))
            if len(g) == batch_size:
                out.append(np.asarray(g))
                pending[int(group[i])] = []
                if len(out) == steps:
                    break
        epoch += 1
    return out


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's share of a global batch (contiguous, so global order is preserved)."""
    if len(indices) % process_count:
        raise DataError(f"batch of {len(indices)} does not split over {process_count} processes")
    per = len(indices) // process_count
    return indices[process_index * per:(process_index + 1) * per]


# ---------------------------------------------------------------- one micro-batch

def _rows(examples: list, layout: Layout, row_length: int | None = None) -> tuple[dict, list[list], int]:
    """(trees by key, rows of keys, row length). Packed: (example, 0) keys, trees packed first-fit
    into rows of ``row_length`` (default ``pack_length``). Unpacked: (example, response) keys, one
    prompt + response per row."""
    if layout.packed:
        trees = {(i, 0): e.tree for i, e in enumerate(examples)}
        rows = batching.pack_rows(trees, row_length or layout.pack_length)
        return trees, [keys for _, keys in rows], max(length for length, _ in rows)
    trees = {(i, j): dataclasses.replace(e.tree, responses=(r,)) for i, e in enumerate(examples)
             for j, r in enumerate(e.tree.responses)}
    return trees, [[k] for k in trees], bucket(max(t.tree_length for t in trees.values()))


def _round_rows(n: int, layout: Layout) -> int:
    m = layout.row_multiple
    return m * bucket(-(-n // m), ROW_LADDER)


def row_length(micro_batches: list[list], layout: Layout) -> int:
    """The packed row length (a ladder length up to ``pack_length``, at least the longest tree)
    that computes the fewest tokens over the micro-batches (shorter rows also attend over less)."""
    longest = max(e.tree.tree_length for mb in micro_batches for e in mb)
    options = [b for b in BUCKETS if longest <= b <= layout.pack_length] or [layout.pack_length]

    def cost(length: int) -> int:
        rows = max(len(_rows(mb, layout, length)[1]) for mb in micro_batches)
        return _round_rows(rows, layout) * length

    return min(options, key=lambda length: (cost(length), length))


def needs(examples: list, layout: Layout, packed_length: int | None = None) -> dict[str, int]:
    """The shape sizes one micro-batch needs (rows, length, slots, targets, pairs)."""
    trees, rows, length = _rows(examples, layout, packed_length)
    return {"rows": len(rows), "length": length,
            "slots": max(sum(len(trees[k].responses) for k in keys) for keys in rows),
            "targets": max(sum(len(r) for k in keys for r in trees[k].responses) for keys in rows),
            "pairs": sum(len(e.pairs) for e in examples)}


def shapes(micro_batches: list[list], layout: Layout) -> dict[str, int]:
    """Bucketed sizes that fit every one of ``micro_batches`` (lists of examples)."""
    packed_length = row_length(micro_batches, layout) if layout.packed else 0
    need = [needs(mb, layout, packed_length) for mb in micro_batches]
    top = {k: max(n[k] for n in need) for k in need[0]}
    m = layout.row_multiple
    return {"rows": _round_rows(top["rows"], layout), "length": top["length"], "packed_length": packed_length,
            "slots": 1 if not layout.packed else bucket(top["slots"], (1, 2, 4, 8) + BUCKETS),
            "targets": bucket(top["targets"]), "pairs": m * bucket(-(-max(top["pairs"], 1) // m), ROW_LADDER)}


def arrays(examples: list, layout: Layout, sizes: dict[str, int]) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """One micro-batch's arrays (see the module docstring) at the given sizes, and per example the
    flat slot index of each of its responses."""
    trees, rows, _ = _rows(examples, layout, sizes.get("packed_length"))
    length = sizes["length"]
    pb = batching.build_packed(trees, rows, length, layout.pad_id, n_rows=sizes["rows"], slots=sizes["slots"],
                               targets=sizes["targets"])
    a = pb.arrays
    slot = pb.slot_of()
    if not layout.packed:  # one plain causal row per response: positions come from the mask
        a = dict(a, attention_mask=(a["segment_ids"] > 0).astype(np.int32))
        if layout.side == "left":
            a = _left_align(a)
    out = {k: a[k] for k in MODEL_KEYS[layout.packed] + SLOT_KEYS + (TARGET_KEYS if layout.targets else ())}
    n_slots = sizes["rows"] * sizes["slots"]
    # flat slot of example i's response j: packed trees are keyed (i, 0), unpacked rows (i, j)
    index_of = (lambda i, j: slot[((i, 0), j)]) if layout.packed else (lambda i, j: slot[((i, j), 0)])
    if layout.trees == "pairs":
        pa, pb_, margin, weight = (np.zeros(sizes["pairs"], t) for t in (np.int32, np.int32, np.float32, np.float32))
        p = 0
        for i, e in enumerate(examples):
            for win, lose in e.pairs:
                pa[p], pb_[p], margin[p], weight[p] = index_of(i, win), index_of(i, lose), e.margin, e.weight
                p += 1
        out.update(pair_a=pa, pair_b=pb_, pair_margin=margin, pair_weight=weight)
    elif layout.trees == "ratings":
        targets = np.zeros((n_slots, layout.num_objectives), np.float32)
        mask = np.zeros_like(targets)
        for i, e in enumerate(examples):
            values = np.array([np.nan if v is None else v for v in e.targets], np.float32)
            targets[index_of(i, 0)] = np.nan_to_num(values)
            mask[index_of(i, 0)] = ~np.isnan(values)
        out.update(seq_targets=targets, seq_target_mask=mask)
    elif layout.trees == "judge":
        label = np.zeros(n_slots, np.int32)
        for i, e in enumerate(examples):
            for j, lab in enumerate(e.labels):
                label[index_of(i, j)] = lab
        out["seq_label"] = label
    return out, [[index_of(i, j) for j in range(len(e.tree.responses))] for i, e in enumerate(examples)]


def _left_align(a: dict) -> dict:
    """Move each unpacked row's tokens to the right end (left padding); positions shift with them."""
    n = a["attention_mask"].sum(axis=1)
    shift = np.where(n > 0, a["attention_mask"].shape[1] - n, 0)  # empty (filler) rows stay as they are
    out = dict(a)
    for key in ("input_ids", "attention_mask"):
        out[key] = np.stack([np.roll(row, s) for row, s in zip(a[key], shift)])
    for key in ("seq_index", "seq_gate_index", "target_index"):
        out[key] = a[key] + shift[:, None]
    return out


def step_arrays(examples: list, micro_batches: list[np.ndarray], layout: Layout,
                sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """[A, ...] arrays of A micro-batches (example indices each) at shared sizes."""
    groups = [[examples[i] for i in mb] for mb in micro_batches]
    sizes = sizes or shapes(groups, layout)
    parts = [arrays(g, layout, sizes)[0] for g in groups]
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def tokens(examples: list, layout: Layout) -> dict[str, int]:
    """Tokens one micro-batch computes: real (the trees, or the unpacked sequences) and padded
    (every position of its arrays, filler rows included)."""
    trees, _, _ = _rows(examples, layout)
    sizes = shapes([examples], layout)
    return {"real": sum(t.tree_length for t in trees.values()), "padded": sizes["rows"] * sizes["length"]}
