"""Run directories: the one durable write every job's outputs go through, and the resumable,
sharded writer of every corpus-scale job (``rmjax score``, ``rmjax features``, the SAE activation cache).

    atomic_write(path, lambda tmp: tmp.write_text(...))   the file is either the old one or the whole new one
    write_json(path, data)                                  the same for a JSON record (metadata, a stage's record)
    RunWriter(out_dir, settings, num_examples=...)         rows written shard by shard, resumable (below)

A file is written to ``.<name>.<pid>.tmp`` beside it, flushed to disk, renamed over the target and
the directory entry flushed too, so a killed process leaves the previous version or the complete
new one, never a torn file; a resumed job reads only what was written whole.

The resumable writer (``RunWriter``; ``rmjax score``'s rows; subclasses add arrays per shard).

Layout of ``out_dir`` (only these names belong to the writer; anything else there is left alone):

    metadata.json               settings, versions, status ("running" | "complete"), counts
    parts/part-XXXXX.parquet    rows of shard k = examples [k*S, (k+1)*S), sorted by ``index``
    tokens.zarr/shard-XXXXX     optional per-token log-probs of shard k: one flat float32 zarr array
    scores.parquet              all parts in ``index`` order, written by ``finalize``

metadata.json, each part and scores.parquet appear by an atomic rename of a fully written, fsynced
temporary file, so a run killed at any moment leaves none of them half-written. A shard's token
array is written and fsynced before its part is renamed into place, so a part's existence means its
shard is done; on opening, temporary files and token arrays without a part are removed. Re-opening
with the same settings resumes with the shards not yet written; other settings are refused unless
``overwrite``. One writer per directory at a time.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np

from rmjax.errors import ConfigError, DataError, RmjaxError


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """``write(tmp)``, fsync, rename over ``path``, fsync the directory: ``path`` is old or whole.
    ``mode``: the file's permissions (e.g. 0o644 for a shared cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """``data`` as indented JSON, written atomically (NumPy arrays and scalars as lists and numbers)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=_jsonable) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, "utf-8"))


# ---------------------------------------------------------------- the resumable writer

FORMAT = "rmjax-scores/1"
REQUIRED_SETTINGS = ("models", "beta", "reduction", "template", "dtype", "data_hash")
LAYOUT_KEYS = ("num_examples", "shard_size", "token_logprobs")  # compared like settings on resume
RESERVED_KEYS = ("format", "settings", *LAYOUT_KEYS, "num_shards", "versions", "status", "created",
                 "completed", "counts", "skipped")
_PART = re.compile(r"part-(\d{5,})\.parquet")
_TOKEN_SHARD = re.compile(r"shard-(\d{5,})")
# ".<name>.<pid>.tmp", made by atomic_write for the writer's own names
_TEMP = re.compile(r"\.(metadata\.json|scores\.parquet|examples\.parquet|part-\d{5,}\.parquet|\.zgroup)\.\d+\.tmp")
_STREAM = re.compile(r"[A-Za-z0-9_]+")
TokenLogprobs = np.ndarray | Mapping[str, np.ndarray]  # one unnamed stream, or named streams


# ---------------------------------------------------------------- durable files

def _write_json(path: Path, data: dict) -> None:
    write_json(path, data, sort_keys=True)


def _canonical(value: Any, what: str) -> Any:
    """The JSON form of ``value`` (tuples become lists), so a stored copy compares equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be JSON-serialisable finite values: {e}") from e


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key, _MISSING), new.get(key, _MISSING), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


_MISSING = object()


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("rmjax", "jax", "jaxlib"):
        try:
            found[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- per-token log-probs

def finished_metadata(path: Path, fmt: str, what: str, make: str, finish: str) -> dict:
    """``path``/metadata.json of a finished run of format ``fmt``, or a DataError that says what
    is wrong: no metadata (``make``: how to make one), another format, not complete (``finish``:
    how to finish it). ``what``: "a feature cache", "an activation cache", ..."""
    meta_path = Path(path) / "metadata.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: missing; {path} is not {what} (make one with {make})")
    metadata = json.loads(meta_path.read_text("utf-8"))
    if metadata.get("format") != fmt:
        raise DataError(f"{meta_path}: not {what} (format {metadata.get('format')!r})")
    if metadata.get("status") != "complete":
        raise DataError(f"{path}: {what} that is not complete; re-run {finish} to finish it")
    return metadata


class ShardArrays:
    """A zarr v2 group holding one array per shard (``shard-XXXXX``), each written whole and made
    durable before the part file that names its shard done (so a shard without a part may be
    partial and is removed). ``MISSING``: the error for a shard that cannot be opened."""

    MISSING = ("{path}: shard {shard} is missing or unreadable ({error}); re-run the shard (delete its part "
               "file) to rewrite it")

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def shard_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}"

    def shards(self) -> set[int]:
        if not self.root.is_dir():
            return set()
        return {int(m.group(1)) for p in self.root.iterdir() if (m := _TOKEN_SHARD.fullmatch(p.name))}

    def remove_shard(self, shard: int) -> None:
        shutil.rmtree(self.shard_path(shard), ignore_errors=True)

    def _spec(self, shard: int) -> dict:
        return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.shard_path(shard))}}

    def write_array(self, shard: int, data: np.ndarray, metadata: dict) -> None:
        """Write ``data`` as shard ``shard`` (zarr ``metadata``: shape, chunks, dtype, ...) and fsync it."""
        import tensorstore as ts

        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / ".zgroup").exists():
            _write_json(self.root / ".zgroup", {"zarr_format": 2})
        store = ts.open({**self._spec(shard), "metadata": metadata}, create=True, delete_existing=True).result()
        store.write(data).result()
        for path in sorted(self.shard_path(shard).rglob("*")):  # durable before the part names it
            if path.is_file():
                fsync_path(path)
        fsync_path(self.shard_path(shard))

    def open_array(self, shard: int):
        import tensorstore as ts

        try:
            return ts.open(self._spec(shard), open=True).result()
        except ValueError as e:
            raise DataError(self.MISSING.format(path=self.shard_path(shard), shard=shard, error=e)) from e


class TokenLogprobWriter(ShardArrays):
    """``tokens.zarr``: one flat float32 array per shard.

    Each example's token log-probs are a slice (offset, count) of its shard's array; the offsets
    live in the rows of the part file, which is renamed into place only after the array is written.
    """

    CHUNK = 1 << 16
    MISSING = ("{path}: token log-probs of shard {shard} are missing or unreadable ({error}); re-run the shard "
               "(delete its part file) to rewrite them")

    def write_shard(self, shard: int, arrays: Sequence[np.ndarray]) -> list[tuple[int, int]]:
        """Write the arrays back to back as shard ``shard``; returns each one's (offset, count)."""
        flat = [np.asarray(a, dtype=np.float32) for a in arrays]
        for i, a in enumerate(flat):
            if a.ndim != 1:
                raise ValueError(f"token log-probs must be 1-D per sequence; item {i} has shape {a.shape}")
        counts = [len(a) for a in flat]
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        data = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        self.write_array(shard, data, {"shape": [len(data)], "chunks": [self.CHUNK], "dtype": "<f4"})
        return [(int(o), c) for o, c in zip(offsets[:-1], counts)]

    def read(self, shard: int, offset: int, count: int) -> np.ndarray:
        return self.open_array(shard)[offset:offset + count].read().result()


def _token_columns(stream: str | None) -> tuple[str, str]:
    return ("token_offset", "token_count") if stream is None else (f"token_offset_{stream}",
                                                                   f"token_count_{stream}")


# ---------------------------------------------------------------- the writer

class RunWriter:
    """Writes the rows of ``rmjax score`` shard by shard into ``out_dir`` (layout: module docstring).

    ``settings`` (JSON-serialisable, with at least REQUIRED_SETTINGS) identify the run: re-opening
    an ``out_dir`` whose metadata.json has other settings, example count, shard size or token
    option raises RmjaxError unless ``overwrite``, which deletes only the writer's own files.
    A subclass with other ``FORMAT`` / ``REQUIRED`` / ``TABLE`` / ``WHAT`` writes another kind of
    resumable run the same way (``rmjax.scoring.features.FeatureWriter``).
    """

    FORMAT = FORMAT
    REQUIRED = REQUIRED_SETTINGS
    TABLE = "scores.parquet"  # the finalized table
    WHAT = "rmjax score run"

    def __init__(self, out_dir: Path | str, settings: dict, *, num_examples: int, shard_size: int = 256,
                 token_logprobs: bool = False, overwrite: bool = False):
        if num_examples < 0 or shard_size < 1:
            raise ConfigError(f"need num_examples >= 0 and shard_size >= 1, got {num_examples} and {shard_size}")
        missing = [k for k in self.REQUIRED if k not in settings]
        if missing:
            raise ConfigError(f"{self.WHAT.removeprefix('rmjax ').removesuffix(' run')} settings lack {missing}; "
                              f"metadata.json must record {list(self.REQUIRED)}")
        self.out_dir = Path(out_dir)
        self.metadata_path = self.out_dir / "metadata.json"
        self.parts_dir = self.out_dir / "parts"
        self.scores_path = self.out_dir / self.TABLE
        self.tokens = TokenLogprobWriter(self.out_dir / "tokens.zarr")
        self.num_examples, self.shard_size, self.token_logprobs = num_examples, shard_size, token_logprobs
        self.num_shards = -(-num_examples // shard_size)
        identity = {"settings": _canonical(settings, "score settings"), "num_examples": num_examples,
                    "shard_size": shard_size, "token_logprobs": token_logprobs}
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise RmjaxError(f"{self.out_dir}: cannot be the output directory ({e}); choose another --out") from e
        previous = self._previous_metadata()
        if overwrite:
            self._delete_owned()
            previous = None
        if previous is None:
            if self.completed_shards() or self.tokens.shards() or self.scores_path.exists():
                raise RmjaxError(f"{self.out_dir} holds parts, arrays or {self.TABLE} but no metadata.json, "
                                 "so it is no run that can be resumed; use another --out or --overwrite")
            self.metadata = {"format": self.FORMAT, **identity, "num_shards": self.num_shards, "versions": _versions(),
                             "status": "running", "created": _now(), "completed": None, "counts": None}
            _write_json(self.metadata_path, self.metadata)
        else:
            old_identity = {"settings": previous.get("settings"), **{k: previous.get(k) for k in LAYOUT_KEYS}}
            changed = _differences(old_identity, identity)
            if changed:
                names = [c.removeprefix("settings.") for c in changed]
                raise RmjaxError(f"{self.metadata_path}: this output directory holds a run with different "
                                 f"settings ({', '.join(names)}); use another --out, or --overwrite to replace it")
            self.metadata = previous
        self.parts_dir.mkdir(exist_ok=True)
        self._remove_leftovers()

    # -- opening

    def _previous_metadata(self) -> dict | None:
        if not self.metadata_path.exists():
            return None
        try:
            data = json.loads(self.metadata_path.read_text("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            data = {"unreadable": str(e)}
        if not isinstance(data, dict) or data.get("format") != self.FORMAT:
            raise RmjaxError(f"{self.metadata_path}: not the metadata of an {self.WHAT} (no format {self.FORMAT!r}); "
                             "move that file away or choose another --out")
        return data

    def _delete_owned(self) -> None:
        """Remove the previous run's files by their exact names; other files in the tree are kept."""
        self.scores_path.unlink(missing_ok=True)
        if self.parts_dir.is_dir():
            for path in self.parts_dir.iterdir():
                if _PART.fullmatch(path.name) or _TEMP.fullmatch(path.name):
                    path.unlink()
            _remove_if_empty(self.parts_dir)
        for shard in self.tokens.shards():
            self.tokens.remove_shard(shard)
        (self.tokens.root / ".zgroup").unlink(missing_ok=True)
        _remove_if_empty(self.tokens.root)
        self._remove_leftovers()
        self.metadata_path.unlink(missing_ok=True)  # last: until here the directory still names its run

    def _remove_leftovers(self) -> None:
        """Temporary files of a killed run, and token arrays whose part never appeared (maybe partial)."""
        for folder in (self.out_dir, self.parts_dir, self.tokens.root):
            if folder.is_dir():
                for path in folder.iterdir():
                    if _TEMP.fullmatch(path.name) and path.is_file():
                        path.unlink()
        for shard in self.tokens.shards() - self.completed_shards():
            self.tokens.remove_shard(shard)

    # -- shards

    def part_path(self, shard: int) -> Path:
        return self.parts_dir / f"part-{shard:05d}.parquet"

    def shard_range(self, shard: int) -> range:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range: this run has shards 0..{self.num_shards - 1}")
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_examples))

    def completed_shards(self) -> set[int]:
        if not self.parts_dir.is_dir():
            return set()
        return {int(m.group(1)) for p in self.parts_dir.iterdir() if (m := _PART.fullmatch(p.name))}

    def pending_shards(self) -> list[int]:
        done = self.completed_shards()
        return [k for k in range(self.num_shards) if k not in done]

    def is_complete(self) -> bool:
        return self.metadata.get("status") == "complete" and self.scores_path.exists()

    def write_shard(self, shard: int, rows: Sequence[Mapping[str, Any]], *, skipped: Mapping[int, str] | None = None,
                    token_logprobs: Sequence[TokenLogprobs] | None = None) -> Path:
        """Write the rows of one shard: exactly its examples except ``skipped`` ({index: reason}).

        ``token_logprobs`` (required iff the writer was opened with ``token_logprobs=True``) is
        aligned with ``rows``: per row one array, or a {stream name: array} mapping (e.g. chosen and
        rejected); the rows gain ``token_offset``/``token_count`` (``token_offset_<name>``/...).
        """
        expected = self.shard_range(shard)
        if self.part_path(shard).exists():
            raise RmjaxError(f"{self.part_path(shard)}: shard {shard} is already written; is another run using "
                             f"{self.out_dir}?")
        skipped = {int(k): str(v) for k, v in (skipped or {}).items()}
        rows = [dict(r) for r in rows]
        self._check_indices(shard, expected, rows, skipped)
        if (token_logprobs is not None) != self.token_logprobs:
            raise ValueError(f"token_logprobs must be given {'with' if self.token_logprobs else 'without'} "
                             f"per-token arrays for every shard of this run (shard {shard})")
        if token_logprobs is not None:
            if len(token_logprobs) != len(rows):
                raise ValueError(f"shard {shard}: {len(token_logprobs)} token log-prob entries for {len(rows)} rows")
            order = sorted(range(len(rows)), key=lambda i: rows[i]["index"])  # layout independent of row order
            rows, token_logprobs = [rows[i] for i in order], [token_logprobs[i] for i in order]
            self._attach_tokens(shard, rows, token_logprobs)
        rows.sort(key=lambda r: r["index"])
        table = _rows_table(rows, shard).replace_schema_metadata(
            {"rmjax.shard": str(shard), "rmjax.skipped": json.dumps(skipped, sort_keys=True)})
        import pyarrow.parquet as pq

        atomic_write(self.part_path(shard), lambda tmp: pq.write_table(table, tmp))
        return self.part_path(shard)

    def _check_indices(self, shard: int, expected: range, rows: list[dict], skipped: dict[int, str]) -> None:
        indices = []
        for i, row in enumerate(rows):
            value = row.get("index")
            if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"shard {shard}: row {i} needs an integer 'index' column, got {value!r}")
            row["index"] = int(value)
            indices.append(int(value))
        counts: dict[int, int] = {}
        for i in indices:
            counts[i] = counts.get(i, 0) + 1
        problems = {
            "duplicate": sorted(i for i, n in counts.items() if n > 1),
            "outside the shard": sorted({i for i in [*counts, *skipped] if i not in expected}),
            "both scored and skipped": sorted(set(counts) & set(skipped)),
            "missing": sorted(i for i in expected if i not in counts and i not in skipped),
        }
        found = {k: v[:10] for k, v in problems.items() if v}
        if found:
            raise ValueError(f"shard {shard} (examples {expected.start}..{expected.stop - 1}) must have one row per "
                             f"example except the skipped ones; {found}")

    def _attach_tokens(self, shard: int, rows: list[dict], token_logprobs: Sequence[TokenLogprobs]) -> None:
        arrays, places = [], []  # places: (row, stream or None) of each array
        for row, item in zip(rows, token_logprobs):
            row["token_shard"] = shard  # the offsets below are positions in tokens.zarr/shard-XXXXX
            streams = item.items() if isinstance(item, Mapping) else [(None, item)]
            for stream, array in streams:
                if stream is not None and not _STREAM.fullmatch(stream):
                    raise ValueError(f"token stream name {stream!r} must be letters, digits and underscores")
                columns = _token_columns(stream)
                if any(c in row for c in columns):
                    raise ValueError(f"shard {shard}: row {row['index']} already has a {columns[0]!r} column")
                arrays.append(array)
                places.append((row, columns))
        for (row, (offset_col, count_col)), (offset, count) in zip(places, self.tokens.write_shard(shard, arrays)):
            row[offset_col], row[count_col] = offset, count

    # -- the end

    def finalize(self, extra_metadata: Mapping[str, Any] | None = None) -> Path:
        """Concatenate the parts into scores.parquet (sorted by ``index``) and mark the run complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        pending = self.pending_shards()
        if pending:
            raise RmjaxError(f"{self.out_dir}: cannot finalize, shards {pending[:10]} (of {self.num_shards}) "
                             "are not written yet; resume the run to score them")
        extra = _canonical(dict(extra_metadata or {}), "extra metadata")
        clash = sorted(set(extra) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"extra metadata keys {clash} are reserved by metadata.json; rename them")
        tables, skipped = [], {}
        for shard in range(self.num_shards):
            table = pq.read_table(self.part_path(shard))
            skipped.update({int(k): v for k, v in json.loads(table.schema.metadata[b"rmjax.skipped"]).items()})
            tables.append(table.replace_schema_metadata(None))
        table = (pa.concat_tables(tables, promote_options="default") if tables
                 else pa.table({"index": pa.array([], pa.int64())}))
        table = table.sort_by("index")
        index = table.column("index").to_numpy()
        if np.any(np.diff(index) <= 0) or len(index) + len(skipped) != self.num_examples:
            raise RmjaxError(f"{self.parts_dir}: the parts hold {len(index)} rows and {len(skipped)} skipped "
                             f"examples for {self.num_examples} examples, or repeat an index; delete the parts "
                             "and re-run")
        atomic_write(self.scores_path, lambda tmp: pq.write_table(table, tmp))
        self.metadata.update(extra)
        self.metadata.update({
            "status": "complete", "completed": _now(),
            "counts": {"examples": self.num_examples, "scored": len(index), "skipped": len(skipped),
                       "shards": self.num_shards},
            "skipped": [{"index": i, "reason": skipped[i]} for i in sorted(skipped)],
        })
        _write_json(self.metadata_path, self.metadata)
        return self.scores_path


def _rows_table(rows: list[dict], shard: int):
    """Rows -> Arrow table with the union of their columns, ``index`` first (missing values null)."""
    import pyarrow as pa

    columns = ["index", *dict.fromkeys(k for row in rows for k in row if k != "index")]
    try:
        return pa.table({c: [row.get(c) for row in rows] for c in columns} if rows
                        else {"index": pa.array([], pa.int64())})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"shard {shard}: a column mixes value types ({e})") from e


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def read_token_logprobs(out_dir: Path | str, index: int, stream: str | None = None) -> np.ndarray:
    """The per-token log-probs of example ``index`` (``stream``: e.g. "chosen", for named streams)."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    meta_path = out_dir / "metadata.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: missing; {out_dir} is no rmjax score output")
    meta = json.loads(meta_path.read_text("utf-8"))
    if not meta.get("token_logprobs"):
        raise DataError(f"{out_dir}: this run stored no per-token log-probs; score with token log-probs on")
    if not 0 <= index < meta["num_examples"]:
        raise DataError(f"{out_dir}: example {index} out of range 0..{meta['num_examples'] - 1}")
    shard = index // meta["shard_size"]
    part = out_dir / "parts" / f"part-{shard:05d}.parquet"
    if not part.exists():
        raise DataError(f"{part}: shard {shard} (example {index}) is not scored yet; resume the run")
    table = pq.read_table(part, filters=[("index", "==", index)])
    if table.num_rows == 0:
        raise DataError(f"{part}: example {index} has no row; it was skipped (see metadata.json 'skipped')")
    row = table.to_pylist()[0]
    offset_col, count_col = _token_columns(stream)
    if row.get(offset_col) is None:
        streams = sorted(k.removeprefix("token_offset_") for k, v in row.items()
                         if k.startswith("token_offset_") and v is not None)
        has_plain = row.get("token_offset") is not None
        raise DataError(f"{part}: example {index} has no token stream {stream!r}; it has "
                        f"{(['None'] if has_plain else []) + streams}")
    return TokenLogprobWriter(out_dir / "tokens.zarr").read(shard, row[offset_col], row[count_col])
