"""Feature cache: a frozen backbone run once over a corpus (ArmoRM stage 0; also SAE inputs).

    records -> the model's chat rendering (+ the gating token, ``rmjax.data.chat.gate_offset``)
            -> shards of consecutive examples (the unit of resumption)
            -> packed prompt trees (prompt once, responses as branches), sharded over the mesh
            -> per example: final-normed hidden states at each response's last token and at the
               gating token, response lengths, ratings -> zarr arrays + one parquet part per shard

Layout of ``out_dir`` (a ``RunWriter`` run of its own format, ``rmjax-features/1``):

    metadata.json                 provenance: model (name and resolved source), data + fingerprint,
                                  template, gating rule, max length, dtype, objectives, versions,
                                  status, counts, throughput
    features.zarr/response        float32 [N, R, D]: hidden state at response j's last token
                                  (R = the most responses of any record; NaN where a record has fewer
                                  or was dropped)
    features.zarr/gate            float32 [N, D]: hidden state at the gating token (the token that
                                  closes the user turn; shared by the responses of a record)
    parts/part-XXXXX.parquet      per example: index, id, place (file:line), kind, subset, n_responses, prompt_tokens,
                                  gate_offset, truncated, response_tokens / response_chars (lists:
                                  the measured verbosity), ratings (list in ``objectives`` order, null
                                  = not rated), weight, margin
    examples.parquet              all parts in index order (``finalize``)

Shard k's rows [k*S, (k+1)*S) are written (and fsynced) to both arrays before its part file is
renamed into place: a part's existence means its shard is done. A killed run re-run with the same
settings rewrites only the shards without a part, so the arrays equal an uninterrupted run's.
``FeatureCache(out_dir)`` reads a finished cache.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import sharding as shd
from rmjax.data import batching
from rmjax.data.chat import template_name
from rmjax.data.records import Record, Share, rating_matrix
from rmjax.distributed import exchange, main_first
from rmjax.errors import DataError, RmjaxError
from rmjax.heads.reward import pooled_response
from rmjax.runs import RunWriter, finished_metadata, fsync_path, write_json
from rmjax.scoring import compute
from rmjax.scoring.packing import packed_hidden

ARRAYS = ("response", "gate")
GATING_RULE = "the token that closes the last user turn (rmjax.data.chat.gate_offset)"


@dataclasses.dataclass
class FeatureSettings:
    template: str = "model"
    max_length: int = 1024
    over_length: str = "truncate"  # truncate (drop oldest prompt tokens) | drop
    shard_size: int = 64  # examples per part (the unit of resumption)
    pack_length: int = 1024  # packed rows of this many tokens (a longer tree gets its own row)
    batch_tokens: int = 4096


class FeatureWriter(RunWriter):
    """The parts + metadata of ``RunWriter``, plus the two feature arrays (module docstring)."""

    FORMAT = "rmjax-features/1"
    REQUIRED = ("model", "template", "dtype", "data_hash", "max_length", "width", "responses", "objectives")
    TABLE = "examples.parquet"
    WHAT = "rmjax feature cache"

    def __init__(self, out_dir: Path | str, settings: dict, *, num_examples: int, shard_size: int = 64,
                 overwrite: bool = False):
        self.features_root = Path(out_dir) / "features.zarr"
        super().__init__(out_dir, settings, num_examples=num_examples, shard_size=shard_size, overwrite=overwrite)
        self.width, self.responses = int(settings["width"]), int(settings["responses"])
        self._stores: dict[str, Any] = {}

    def _delete_owned(self) -> None:
        shutil.rmtree(self.features_root, ignore_errors=True)
        super()._delete_owned()

    def _shape(self, name: str) -> tuple[list[int], list[int]]:
        n, s = self.num_examples, min(self.shard_size, max(self.num_examples, 1))
        if name == "response":
            return [n, self.responses, self.width], [s, self.responses, self.width]
        return [n, self.width], [s, self.width]

    def store(self, name: str):
        """The tensorstore array ``name`` (created, NaN-filled, on first use)."""
        import tensorstore as ts

        if name not in self._stores:
            shape, chunks = self._shape(name)
            self.features_root.mkdir(parents=True, exist_ok=True)
            if not (self.features_root / ".zgroup").exists():
                write_json(self.features_root / ".zgroup", {"zarr_format": 2}, sort_keys=True)
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.features_root / name)}}
            if (self.features_root / name / ".zarray").exists():
                store = ts.open(spec, open=True).result()
                if list(store.shape) != shape:
                    raise RmjaxError(f"{self.features_root / name}: shape {list(store.shape)}, this run needs {shape}; "
                                     "use another --out or --overwrite")
            else:
                meta = {"shape": shape, "chunks": chunks, "dtype": "<f4", "fill_value": "NaN", "compressor": None}
                store = ts.open({**spec, "metadata": meta}, create=True).result()
            self._stores[name] = store
        return self._stores[name]

    def write_shard(self, shard: int, rows, *, skipped=None, arrays: dict[str, np.ndarray] | None = None,
                    token_logprobs=None) -> Path:
        """``arrays``: {"response": [n, R, D], "gate": [n, D]} for exactly the shard's examples."""
        span = self.shard_range(shard)
        if arrays is None or set(arrays) != set(ARRAYS):
            raise ValueError(f"shard {shard}: give the arrays {list(ARRAYS)}")
        for name in ARRAYS:
            value = np.asarray(arrays[name], np.float32)
            want = (len(span), *self._shape(name)[0][1:])
            if value.shape != want:
                raise ValueError(f"shard {shard}: array {name!r} has shape {value.shape}, expected {want}")
            self.store(name)[span.start:span.stop].write(value).result()
        for name in ARRAYS:  # durable before the part names the shard done
            for path in sorted((self.features_root / name).rglob("*")):
                if path.is_file():
                    fsync_path(path)
            fsync_path(self.features_root / name)
        return super().write_shard(shard, rows, skipped=skipped)


# ---------------------------------------------------------------- computing the features

@functools.lru_cache(maxsize=None)
def feature_fn(config) -> Callable:
    """jit'd (params, packed arrays) -> {"response", "gate"} [R, S, D] float32 per slot."""

    def fn(params, batch):
        hidden = packed_hidden(params, config, batch)  # after the final norm
        return {"response": compute.gather_positions(hidden, batch["seq_index"]).astype(jnp.float32),
                "gate": compute.gather_positions(hidden, batch["seq_gate_index"]).astype(jnp.float32)}

    return jax.jit(fn)


class FeatureExtractor:
    """Runs one frozen model over shards of records and returns rows + feature arrays."""

    def __init__(self, loaded, settings: FeatureSettings, objectives: tuple[str, ...] = (), mesh=None,
                 strategy: str = "dp"):
        self.loaded, self.s, self.objectives = loaded, settings, tuple(objectives)
        self.mesh, self.strategy = mesh, strategy
        self.fn = feature_fn(loaded.config)
        self.real_tokens = 0
        self.padded_tokens = 0

    def _place(self, batch: dict) -> dict:
        if self.mesh is None:
            return batch
        return {k: jax.device_put(v, shd.batch_sharding(self.mesh, v.shape)) for k, v in batch.items()}

    def encode(self, records: list[Record]) -> tuple[dict[int, batching.Encoded], dict[int, str]]:
        s, tok = self.s, self.loaded.tokenizer
        encoded, dropped = {}, {}
        for rec in records:
            if not rec.prompt:
                dropped[rec.index] = f"{rec.id}: no prompt turns, so no gating token"
                continue
            e = batching.encode(tok, rec, s.template, s.max_length, s.over_length, gate=True)
            if isinstance(e, str):
                dropped[rec.index] = e
            else:  # read where transformers' classifier reads an export (the last token not the pad id)
                encoded[rec.index] = dataclasses.replace(
                    e, responses=tuple(pooled_response(r, tok.pad_id) for r in e.responses))
        return encoded, dropped

    def features(self, encoded: dict[int, batching.Encoded], width: int, responses: int
                 ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{example index: (response features [R, D] NaN-padded, gate feature [D])}."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if not encoded:
            return out
        pad = self.loaded.tokenizer.pad_id
        batches = batching.packed_batches(encoded, pad, row_length=self.s.pack_length,
                                          batch_tokens=self.s.batch_tokens)
        for pb in batches:
            self.real_tokens += pb.real_tokens
            self.padded_tokens += pb.padded_tokens
            if self.mesh is None:
                res = self.fn(self.loaded.params, pb.arrays)
            else:
                with shd.activate(self.mesh, self.strategy):
                    res = self.fn(self.loaded.params, self._place(pb.arrays))
            res = {k: np.asarray(jax.device_get(v)).reshape(-1, width) for k, v in res.items()}
            for flat, seq in enumerate(pb.sequences):
                if seq is None:
                    continue
                key, j = seq
                if key not in out:
                    out[key] = (np.full((responses, width), np.nan, np.float32), res["gate"][flat])
                out[key][0][j] = res["response"][flat]
        return out

    def shard(self, records: list[Record], width: int, responses: int
              ) -> tuple[list[dict], dict[int, str], dict[str, np.ndarray]]:
        """Rows (kept examples), {index: drop reason} and the shard's arrays (NaN rows where dropped)."""
        encoded, dropped = self.encode(records)
        feats = self.features(encoded, width, responses)
        ratings = _ratings(records, self.objectives)
        response = np.full((len(records), responses, width), np.nan, np.float32)
        gate = np.full((len(records), width), np.nan, np.float32)
        rows = []
        for i, rec in enumerate(records):
            if rec.index not in feats:
                continue
            response[i], gate[i] = feats[rec.index]
            e = encoded[rec.index]
            rows.append({"index": rec.index, "id": rec.id, "place": rec.place, "kind": rec.kind, "subset": rec.subset,
                         "n_responses": len(rec.responses), "prompt_tokens": len(e.prompt),
                         "gate_offset": e.gate, "truncated": e.truncated,
                         "response_tokens": [len(r) for r in e.responses],
                         "response_chars": [len(r) for r in rec.responses],
                         "ratings": ratings[i], "weight": rec.weight, "margin": rec.margin})
        return rows, dropped, {"response": response, "gate": gate}


def _ratings(records: list[Record], objectives: tuple[str, ...]) -> list[list | None]:
    """Per record its ratings in ``objectives`` order (None where not rated), or None without ratings."""
    if not objectives:
        return [None] * len(records)
    rated = [r for r in records if r.ratings is not None]
    _, values = rating_matrix(rated, objectives)
    by_index = {r.index: v for r, v in zip(rated, values)}
    return [by_index.get(r.index) for r in records]


def objectives_of(records: list[Record]) -> tuple[str, ...]:
    first = next((r for r in records if r.ratings is not None), None)
    return () if first is None else tuple(n for n, _ in first.ratings)


def _share_stats(share: Share) -> tuple[tuple[str, ...], int]:
    """(the first rated record's objectives, the most responses of a record) over this process's
    shards, read a shard at a time (a lazy share holds no records)."""
    objectives, responses = (), 0
    for k in range(-(-share.total // share.shard_size)):
        if share.owned(k):
            recs = share.shard_records(k)
            objectives = objectives or objectives_of(recs)
            responses = max([responses, *(len(r.responses) for r in recs)])
    return objectives, responses


def cache_features(records: list[Record] | Share, loaded, out_dir: Path | str, *, settings: FeatureSettings,
                   provenance: dict, dtype: str = "float32", mesh=None, strategy: str = "dp",
                   overwrite: bool = False, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Cache the features of ``records`` in ``out_dir`` (module docstring); returns the metadata.

    ``records``: all of them (several processes then split the shards k % processes), or this
    process's ``Share`` (``distributed.read_share`` with ``shard_size=settings.shard_size``: each
    process caches the shards that start in its part). ``provenance`` (JSON: model name and
    source, data, data_hash, sample, ...) joins the settings that identify the run; re-running with
    the same ones resumes, other ones are refused.
    """

    if isinstance(records, Share):
        if records.shard_size != settings.shard_size:
            raise ValueError(f"the share was read for shards of {records.shard_size}, the cache has "
                             f"{settings.shard_size}: read it with shard_size=settings.shard_size")
        share = records
    else:
        share = Share(list(records), len(records), 0, (0, len(records)), settings.shard_size)
    if not share.total:
        raise DataError("no records to cache")
    stats = exchange("comparing the records", lambda: _share_stats(share))
    objectives = next((o for o, _ in stats if o), ())
    width = loaded.config.hidden_size
    responses = max(r for _, r in stats)
    ident = {**provenance, "template": template_name(loaded.tokenizer, settings.template), "dtype": dtype,
             "max_length": settings.max_length, "over_length": settings.over_length,
             "pack_length": settings.pack_length, "batch_tokens": settings.batch_tokens,
             "width": width, "responses": responses, "objectives": list(objectives), "gating_token": GATING_RULE,
             "features": "final-normed hidden state (after the model's final norm)"}
    def open_writer(first: bool) -> FeatureWriter:
        w = FeatureWriter(out_dir, ident, num_examples=share.total, shard_size=settings.shard_size,
                          overwrite=overwrite and first)
        if first and not w.is_complete():  # the arrays exist before any process writes its shards
            for name in ARRAYS:
                w.store(name)
        return w

    writer = main_first(open_writer)
    if writer.is_complete():
        return writer.metadata
    ex = FeatureExtractor(loaded, settings, objectives, mesh=mesh, strategy=strategy)
    pending = writer.pending_shards()
    if records is share:  # pods: the shards that start in this process's part
        mine = [k for k in pending if share.owned(k)]
    else:  # every process has every record: shards by process
        mine = [k for k in pending if k % jax.process_count() == jax.process_index()]
    done = share.total - sum(len(writer.shard_range(k)) for k in pending)
    t0 = time.perf_counter()
    for k in mine:
        recs = share.shard_records(k)
        rows, dropped, arrays = ex.shard(recs, width, responses)
        writer.write_shard(k, rows, skipped=dropped, arrays=arrays)
        done += len(recs)
        if progress is not None:
            progress(done, share.total, ex.real_tokens / max(time.perf_counter() - t0, 1e-9))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rmjax-features-shards")
        if jax.process_index() != 0:
            return writer.metadata
    elapsed = time.perf_counter() - t0
    # of this invocation (a resumed run counts only the shards it computed)
    throughput = {"seconds": round(elapsed, 3), "shards": len(mine), "tokens": ex.real_tokens,
                  "padded_tokens": ex.padded_tokens, "tokens_per_s": round(ex.real_tokens / max(elapsed, 1e-9), 1)}
    writer.finalize({"throughput": throughput})
    return writer.metadata


# ---------------------------------------------------------------- reading a cache

class FeatureCache:
    """A finished feature cache: arrays and per-example rows, aligned by example index."""

    def __init__(self, path: Path | str):
        import pandas as pd

        self.path = Path(path)
        self.metadata = finished_metadata(self.path, FeatureWriter.FORMAT, "a feature cache",
                                          "`rmjax features --model M --data D --out DIR`",
                                          "the same `rmjax features` command")
        self.settings = self.metadata["settings"]
        self.objectives = tuple(self.settings.get("objectives", ()))
        table = pd.read_parquet(self.path / FeatureWriter.TABLE)
        if not len(table):
            reasons = [s["reason"] for s in self.metadata.get("skipped", [])]
            raise DataError(f"{self.path}: every example was dropped (first: {reasons[0] if reasons else '?'}); "
                            "re-cache with a larger --max-length or --over-length truncate")
        self.examples = table.sort_values("index").reset_index(drop=True)
        self.index = self.examples["index"].to_numpy()

    def _read(self, name: str) -> np.ndarray:
        import tensorstore as ts

        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.path / "features.zarr" / name)}}
        return np.asarray(ts.open(spec, open=True).result().read().result())

    def response(self) -> np.ndarray:
        """[n, R, D] for the kept examples (rows of ``examples``)."""
        return self._read("response")[self.index]

    def gate(self) -> np.ndarray:
        """[n, D] for the kept examples."""
        return self._read("gate")[self.index]

    def ratings(self) -> np.ndarray:
        """[n, K] float (NaN = not rated) in ``objectives`` order."""
        k = len(self.objectives)
        rows = [np.full(k, np.nan) if v is None else np.array([np.nan if x is None else x for x in v], float)
                for v in self.examples["ratings"]]
        return np.stack(rows) if rows else np.zeros((0, k))

    def response_tokens(self) -> np.ndarray:
        """[n, R] response lengths in tokens (NaN where a record has fewer responses)."""
        r = int(self.settings["responses"])
        out = np.full((len(self.examples), r), np.nan)
        for i, v in enumerate(self.examples["response_tokens"]):
            out[i, :len(v)] = v
        return out

    @property
    def kinds(self) -> np.ndarray:
        return self.examples["kind"].to_numpy()

    @property
    def subsets(self) -> np.ndarray:
        return self.examples["subset"].to_numpy()
