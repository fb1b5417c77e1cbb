"""Per-token activation cache: the residual stream of one layer at every real token, for SAE training.

    records -> the model's chat rendering -> shards of consecutive examples (the unit of resumption)
            -> packed prompt trees (``rmjax.data.batching``: each prompt once, responses as branches)
            -> the residual stream after layer L (``forward(..., return_all_hidden=True).all_hidden[L]``:
               0 = the embeddings, num_layers = the last layer's output before the final norm)
            -> float32 rows, one per real token (or per response token), into one zarr array per shard

Layer L's residual is computed by running only the first L layers (the rest of the stack would be
discarded). Layout of ``out_dir`` (a ``RunWriter`` run of its own format, ``rmjax-activations/1``):

    metadata.json                     provenance and settings (model, data + fingerprint, layer,
                                      tokens kept, template, max length), status, counts, and
                                      ``shard_rows``: the rows of each shard
    activations.zarr/shard-XXXXX      float32 [n_k, D]: shard k's rows
    positions.zarr/shard-XXXXX        int32 [n_k, 4]: per row (example index, response (-1 for a
                                      prompt token), position in the sequence, token id)
    parts/part-XXXXX.parquet          per example: index, id, place, kind, n_responses, prompt_tokens,
                                      response_tokens (list), truncated, row_offset (its first row
                                      within the shard), rows
    examples.parquet                  all parts in index order

Rows of a shard are ordered by (example, response, position): an example's prompt tokens come once
(responses -1), then each response's tokens. Global row numbers run over the shards in order. Both
arrays of shard k are written and fsynced before its part is renamed into place; a killed run
re-run with the same settings rewrites only the shards without a part (arrays of unfinished shards
are removed on opening), so the cache equals an uninterrupted run's. Single process.

``ActivationCache(out_dir)`` reads a finished cache; ``batches`` streams seeded, shuffled batches
of rows (a few shards in memory at a time) for ``rmjax.sae.train.train_sae``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.data import batching
from rmjax.data.chat import template_name
from rmjax.data.records import Record
from rmjax.errors import ConfigError, DataError
from rmjax.models.transformer import forward, layer_range
from rmjax.runs import RunWriter, ShardArrays, finished_metadata

TOKENS = ("all", "response")
POSITION_COLUMNS = ("example", "response", "position", "token")


@dataclasses.dataclass
class ActivationSettings:
    template: str = "model"
    max_length: int = 1024
    over_length: str = "truncate"  # truncate (drop oldest prompt tokens) | drop
    tokens: str = "all"  # all real tokens | response: only response tokens
    shard_size: int = 64  # examples per shard (the unit of resumption)
    pack_length: int = 1024
    batch_tokens: int = 4096


def resolve_layer(layer: int, num_layers: int) -> int:
    """``layer`` as an index into the num_layers + 1 hidden states (negative: from the end)."""
    n = num_layers + 1
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
        raise ConfigError(f"layer {layer!r} is outside the {n} hidden states of this model (0 = the embeddings, "
                          f"{num_layers} = the last layer's output; negative counts from the end: -{n}..{n - 1})")
    return int(layer) % n


@functools.lru_cache(maxsize=None)
def residual_fn(config, layer: int) -> Callable:
    """jit'd (params, packed arrays) -> the residual stream after ``layer`` layers [R, T, D] float32,
    running only those layers (layer 0: the embeddings, from a one-layer run's ``all_hidden[0]``)."""
    layer = resolve_layer(layer, config.num_layers)
    n = max(layer, 1)

    def fn(params, batch):
        cfg, prefix = layer_range(params, config, 0, n)
        out = forward(prefix, cfg, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                      branch_ids=batch["branch_ids"], final_norm=False, return_all_hidden=layer == 0)
        return (out.all_hidden[0] if layer == 0 else out.hidden).astype(jnp.float32)

    return jax.jit(fn)


def text_records(pairs: Sequence[tuple[str, str]]) -> list[Record]:
    """(prompt, response) texts -> single records (the prompt as one user turn), index = position."""
    return [Record(str(i), (("user", prompt),), (response,), "single", i) for i, (prompt, response) in enumerate(pairs)]


# ---------------------------------------------------------------- writing

class _ShardArrays(ShardArrays):
    """One 2-D array [n_k, width] per shard."""

    MISSING = ("{path}: shard {shard} is missing or unreadable ({error}); re-run the same cache_activations call "
               "after deleting its part file to rewrite it")

    def __init__(self, root: Path, dtype: str):
        super().__init__(root)
        self.dtype = dtype

    def write(self, shard: int, value: np.ndarray) -> None:
        n, width = value.shape
        self.write_array(shard, value, {"shape": [n, width], "chunks": [max(1, min(n, 1 << 14)), width],
                                        "dtype": self.dtype, "compressor": None})

    def read(self, shard: int) -> np.ndarray:
        return np.asarray(self.open_array(shard).read().result())

    def rows(self, shard: int) -> int:
        return int(self.open_array(shard).shape[0])


class ActivationWriter(RunWriter):
    """The parts + metadata of ``RunWriter``, plus each shard's activation and position arrays."""

    FORMAT = "rmjax-activations/1"
    REQUIRED = ("model", "data_hash", "layer", "tokens", "template", "max_length", "width")
    TABLE = "examples.parquet"
    WHAT = "rmjax activation cache"

    def __init__(self, out_dir: Path | str, settings: dict, *, num_examples: int, shard_size: int = 64,
                 overwrite: bool = False):
        self.activations = _ShardArrays(Path(out_dir) / "activations.zarr", "<f4")
        self.positions = _ShardArrays(Path(out_dir) / "positions.zarr", "<i4")
        super().__init__(out_dir, settings, num_examples=num_examples, shard_size=shard_size, overwrite=overwrite)
        self.width = int(settings["width"])

    def _arrays(self) -> tuple[_ShardArrays, _ShardArrays]:
        return self.activations, self.positions

    def _delete_owned(self) -> None:
        for arrays in self._arrays():
            shutil.rmtree(arrays.root, ignore_errors=True)
        super()._delete_owned()

    def _remove_leftovers(self) -> None:
        super()._remove_leftovers()
        for arrays in self._arrays():  # arrays of a shard whose part never appeared may be partial
            for shard in arrays.shards() - self.completed_shards():
                arrays.remove_shard(shard)

    def write_shard(self, shard: int, rows, *, skipped=None, arrays: dict[str, np.ndarray] | None = None,
                    token_logprobs=None) -> Path:
        """``arrays``: {"activations": [n, D] float32, "positions": [n, 4] int32} for the shard's rows."""
        if arrays is None or set(arrays) != {"activations", "positions"}:
            raise ValueError(f"shard {shard}: give the arrays 'activations' and 'positions'")
        x = np.asarray(arrays["activations"], np.float32)
        pos = np.asarray(arrays["positions"], np.int32)
        if x.ndim != 2 or x.shape[1] != self.width or pos.shape != (len(x), len(POSITION_COLUMNS)):
            raise ValueError(f"shard {shard}: activations {x.shape} and positions {pos.shape} must be [n, "
                             f"{self.width}] and [n, {len(POSITION_COLUMNS)}]")
        self.activations.write(shard, x)
        self.positions.write(shard, pos)
        return super().write_shard(shard, rows, skipped=skipped)


# ---------------------------------------------------------------- computing

def shard_activations(loaded, records: list[Record], layer: int, settings: ActivationSettings
                      ) -> tuple[list[dict], dict[int, str], np.ndarray, np.ndarray, int]:
    """Per-example rows, {index: drop reason}, activations [n, D], positions [n, 4] of ``records``
    (ordered by example, response, position) and the real tokens run."""
    s, tok = settings, loaded.tokenizer
    encoded, dropped = {}, {}
    for rec in records:
        e = batching.encode(tok, rec, s.template, s.max_length, s.over_length)
        if isinstance(e, str):
            dropped[rec.index] = e
        elif not len(e.prompt):
            dropped[rec.index] = f"{rec.id}: the rendering has no prompt token for the first response token to follow"
        else:
            encoded[rec.index] = e
    fn = residual_fn(loaded.config, resolve_layer(layer, loaded.config.num_layers))
    xs, metas, real = [], [], 0
    if encoded:
        for pb in batching.packed_batches(encoded, tok.pad_id, row_length=s.pack_length, batch_tokens=s.batch_tokens):
            real += pb.real_tokens
            a = pb.arrays
            hidden = np.asarray(jax.device_get(fn(loaded.params, a)))
            n_rows, n_slots = a["seq_index"].shape
            keys = np.full((n_rows, n_slots + 1), -1, np.int64)  # per row: example of segment s + 1
            for r in range(n_rows):
                row_keys = dict.fromkeys(q[0] for q in pb.sequences[r * n_slots:(r + 1) * n_slots] if q is not None)
                keys[r, :len(row_keys)] = list(row_keys)
            keep = a["segment_ids"] > 0
            if s.tokens == "response":
                keep &= a["branch_ids"] > 0
            rr, tt = np.nonzero(keep)
            xs.append(hidden[rr, tt])
            metas.append(np.stack([keys[rr, a["segment_ids"][rr, tt] - 1], a["branch_ids"][rr, tt] - 1,
                                   a["positions"][rr, tt], a["input_ids"][rr, tt]], axis=1).astype(np.int32))
    width = loaded.config.hidden_size
    x = np.concatenate(xs) if xs else np.zeros((0, width), np.float32)
    meta = np.concatenate(metas) if metas else np.zeros((0, len(POSITION_COLUMNS)), np.int32)
    order = np.lexsort((meta[:, 2], meta[:, 1], meta[:, 0]))
    x, meta = x[order], meta[order]
    starts = np.searchsorted(meta[:, 0], [r.index for r in records])
    ends = np.searchsorted(meta[:, 0], [r.index for r in records], side="right")
    rows = []
    for rec, start, end in zip(records, starts, ends):
        if rec.index not in encoded:
            continue
        e = encoded[rec.index]
        rows.append({"index": rec.index, "id": rec.id, "place": rec.place, "kind": rec.kind,
                     "n_responses": len(rec.responses), "prompt_tokens": len(e.prompt),
                     "response_tokens": [len(r) for r in e.responses], "truncated": e.truncated,
                     "row_offset": int(start), "rows": int(end - start)})
    return rows, dropped, x, meta, real


def cache_activations(records: list[Record], loaded, out_dir: Path | str, *, layer: int,
                      settings: ActivationSettings | None = None, provenance: dict | None = None,
                      overwrite: bool = False, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Cache layer ``layer``'s residual stream at the tokens of ``records`` in ``out_dir`` (module
    docstring); returns the metadata. ``provenance`` (JSON; at least "model" and "data_hash",
    e.g. from ``rmjax.data.records.input_fingerprint``) joins the settings that identify the run:
    re-running with the same ones resumes, other ones are refused unless ``overwrite``."""
    settings = settings or ActivationSettings()
    layer = resolve_layer(layer, loaded.config.num_layers)
    if jax.process_count() > 1:
        raise ConfigError("cache_activations runs in one process; run it on one host (the arrays are per shard, so "
                          "hosts may also each cache their own part of the records into their own directories)")
    if settings.tokens not in TOKENS:
        raise ConfigError(f"ActivationSettings.tokens must be one of {TOKENS}, got {settings.tokens!r}")
    if not records:
        raise DataError("no records to cache")
    wrong = next((i for i, r in enumerate(records) if r.index != i), None)
    if wrong is not None:
        raise DataError(f"records[{wrong}] has index {records[wrong].index}; the records must be numbered 0..N-1 "
                        "in order (as read_records and text_records return them)")
    provenance = {"model": loaded.source or "?", "data_hash": "?", **(provenance or {})}
    ident = {**provenance, "layer": layer, "num_layers": loaded.config.num_layers, "tokens": settings.tokens,
             "template": template_name(loaded.tokenizer, settings.template), "max_length": settings.max_length,
             "over_length": settings.over_length, "pack_length": settings.pack_length,
             "batch_tokens": settings.batch_tokens, "width": loaded.config.hidden_size,
             "activations": "residual stream after `layer` layers (0 = embeddings; before the final norm)"}
    writer = ActivationWriter(out_dir, ident, num_examples=len(records), shard_size=settings.shard_size,
                              overwrite=overwrite)
    if writer.is_complete():
        return writer.metadata
    pending = writer.pending_shards()
    done = len(records) - sum(len(writer.shard_range(k)) for k in pending)
    t0, tokens = time.perf_counter(), 0
    for k in pending:
        recs = [records[i] for i in writer.shard_range(k)]
        rows, dropped, x, meta, real = shard_activations(loaded, recs, layer, settings)
        writer.write_shard(k, rows, skipped=dropped, arrays={"activations": x, "positions": meta})
        done, tokens = done + len(recs), tokens + real
        if progress is not None:
            progress(done, len(records), tokens / max(time.perf_counter() - t0, 1e-9))
    shard_rows = [writer.positions.rows(k) for k in range(writer.num_shards)]
    elapsed = time.perf_counter() - t0
    writer.finalize({"rows": sum(shard_rows), "shard_rows": shard_rows,
                     "throughput": {"seconds": round(elapsed, 3), "shards": len(pending), "tokens": tokens}})
    return writer.metadata


# ---------------------------------------------------------------- reading

class ActivationCache:
    """A finished activation cache: per-shard row arrays, their positions, and the examples table."""

    def __init__(self, path: Path | str):
        import pandas as pd

        self.path = Path(path)
        self.metadata = finished_metadata(self.path, ActivationWriter.FORMAT, "an activation cache",
                                          "rmjax.sae.activations.cache_activations",
                                          "the same cache_activations call")
        self.settings = self.metadata["settings"]
        self.layer, self.width = int(self.settings["layer"]), int(self.settings["width"])
        self.shard_rows = np.asarray(self.metadata["shard_rows"], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])  # first global row of each shard
        self.num_rows = int(self.offsets[-1])
        self.examples = pd.read_parquet(self.path / ActivationWriter.TABLE).sort_values("index").reset_index(drop=True)
        self._activations = _ShardArrays(self.path / "activations.zarr", "<f4")
        self._positions = _ShardArrays(self.path / "positions.zarr", "<i4")

    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    def shard(self, k: int) -> np.ndarray:
        """Shard k's rows [n_k, D] float32."""
        return self._activations.read(k)

    def shard_positions(self, k: int) -> np.ndarray:
        """Shard k's (example, response, position, token) [n_k, 4] int32."""
        return self._positions.read(k)

    def array(self) -> np.ndarray:
        """All rows [N, D] (for caches that fit in memory)."""
        return np.concatenate([self.shard(k) for k in range(self.num_shards)]) if self.num_shards \
            else np.zeros((0, self.width), np.float32)

    def positions(self):
        """A DataFrame of every row's example, response (-1: prompt), position and token, in row order."""
        import pandas as pd

        parts = [self.shard_positions(k) for k in range(self.num_shards)]
        data = np.concatenate(parts) if parts else np.zeros((0, len(POSITION_COLUMNS)), np.int32)
        return pd.DataFrame(data, columns=list(POSITION_COLUMNS))

    def batches(self, batch_size: int, *, seed: int = 0, epochs: int | None = 1, buffer_shards: int = 8,
                with_rows: bool = False) -> Iterator:
        """Shuffled batches [b, D] of the rows, every row once per epoch (``epochs=None``: forever).

        Per epoch (seeded by ``seed`` and the epoch) the shards come in a random order,
        ``buffer_shards`` at a time; their rows (and the previous group's leftover) are shuffled
        and cut into batches of ``batch_size``; the epoch's last batch may be smaller. With
        ``with_rows`` each item is (batch, global row numbers [b]).
        """
        if batch_size < 1 or buffer_shards < 1:
            raise ConfigError(f"batch_size and buffer_shards must be >= 1, got {batch_size} and {buffer_shards}")
        if self.num_rows == 0:
            raise DataError(f"{self.path}: the cache holds no rows (every example was dropped)")
        filled = [k for k in range(self.num_shards) if self.shard_rows[k]]
        for epoch in itertools.count() if epochs is None else range(epochs):
            rng = np.random.default_rng([seed, epoch])
            order = [filled[i] for i in rng.permutation(len(filled))]
            x_left, id_left = np.zeros((0, self.width), np.float32), np.zeros(0, np.int64)
            for g in range(0, len(order), buffer_shards):
                group = order[g:g + buffer_shards]
                x = np.concatenate([x_left, *(self.shard(k) for k in group)])
                ids = np.concatenate([id_left, *(np.arange(self.offsets[k], self.offsets[k + 1]) for k in group)])
                perm = rng.permutation(len(x))
                x, ids = x[perm], ids[perm]
                full = len(x) // batch_size * batch_size
                for i in range(0, full, batch_size):
                    yield (x[i:i + batch_size], ids[i:i + batch_size]) if with_rows else x[i:i + batch_size]
                x_left, id_left = x[full:], ids[full:]
            if len(x_left):
                yield (x_left, id_left) if with_rows else x_left
