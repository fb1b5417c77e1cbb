"""Run directories: the one durable write every job's outputs go through, and the resumable,
sharded writer of every corpus-scale job (``rmjax score``, ``rmjax features``, the SAE activation cache).

    atomic_write(path, lambda tmp: tmp.write_text(...))   the file is either the old one or the whole new one
    write_json(path, data)                                  the same for a JSON record (metadata, a stage's record)
    RunWriter(out_dir, settings, num_examples=...)         rows written shard by shard, resumable (below)

A file is written to ``.<name>.<pid>.tmp`` beside it, flushed to disk, renamed over the target and
the directory entry flushed too, so a killed process leaves the previous version or the complete
new one, never a torn file; a resumed job reads only what was written whole.

The resumable writer (``RunWriter``; ``rmjax score``'s rows; subclasses add arrays per shard).

A shard (``shard_size`` consecutive examples) is the unit of work and of resumption; a part file
(about ``part_rows`` rows, default 100,000) is the unit of storage, so a corpus of 10M examples leaves
about 100 files, not one per shard. Layout of ``out_dir`` (only these names belong to the writer;
anything else there is left alone):

    metadata.json                    settings, versions, status ("running" | "complete"), counts
    parts/open-XXXXX.rows + .index   the part being written: each finished shard's rows appended as
                                     one Parquet blob, then a line of the index that names the shard,
                                     its bytes and its skipped examples (both fsynced per shard)
    parts/part-XXXXX.parquet         a sealed part: shards XXXXX.. (consecutive), rows sorted by
                                     ``index``, made from an open part once it holds ``part_rows``
                                     rows or the next shard is not the next one in order
    tokens.zarr/shard-XXXXX          optional per-token log-probs of shard k: one flat float32 zarr array
    scores.parquet                   every row in ``index`` order, streamed from the parts by
                                     ``finalize`` (memory bounded by a part, not by the corpus), which
                                     then removes the parts

A shard is done when its index line is whole and its bytes are in the rows file; a run killed at any
moment (mid-blob, mid-line, mid-seal) leaves a prefix of whole shards, and reopening cuts a torn tail
off, removes an open part whose sealed copy exists, and removes temporary files and token arrays
without a done shard. metadata.json, each sealed part and scores.parquet appear by an atomic rename
of a fully written, fsynced temporary file. Re-opening with the same settings resumes with the shards
not yet done; other settings are refused unless ``overwrite``. One writer per shard: several
processes may write one directory, each its own shards (their open parts are named by their first
shard); the first process to open a run tidies it (``tidy``) before the others open it.
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
from typing import Any, NamedTuple

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
PART_ROWS = 100_000  # rows per sealed part file (storage; the unit of resumption is the shard)
REQUIRED_SETTINGS = ("models", "beta", "reduction", "template", "dtype", "data_hash")
LAYOUT_KEYS = ("num_examples", "shard_size", "token_logprobs")  # compared like settings on resume
RESERVED_KEYS = ("format", "settings", *LAYOUT_KEYS, "num_shards", "versions", "status", "created",
                 "completed", "counts", "skipped")
_PART = re.compile(r"part-(\d{5,})\.parquet")
_OPEN = re.compile(r"open-(\d{5,})\.(rows|index)")
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

class _Shard(NamedTuple):
    """Where a done shard's rows are: a sealed part (``offset`` -1) or a blob of an open part."""

    path: Path
    offset: int
    length: int
    rows: int
    skipped: dict


class _Open:
    """The open part this writer appends to (``parts/open-FIRST.rows`` + ``.index``)."""

    def __init__(self, parts_dir: Path, first: int):
        self.first, self.last, self.rows, self.entries = first, first - 1, 0, []
        self.data, self.index = _open_paths(parts_dir, first)


def _open_paths(parts_dir: Path, first: int) -> tuple[Path, Path]:
    return parts_dir / f"open-{first:05d}.rows", parts_dir / f"open-{first:05d}.index"


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _index_entries(index: Path, data_size: int) -> tuple[list[dict], int]:
    """The whole entries of an open part's index whose bytes are all in its rows file, and the byte
    length of the index they take (a torn or dangling tail is what a kill leaves)."""
    entries, used = [], 0
    raw = index.read_bytes() if index.exists() else b""
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            e = json.loads(line)
            if e["offset"] + e["length"] > data_size:
                break
        except (ValueError, KeyError, TypeError):
            break
        entries.append(e)
        used += len(line)
    return entries, used


def _blob_table(path: Path, offset: int, length: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        f.seek(offset)
        return pq.read_table(pa.BufferReader(f.read(length)))


def scan_shards(out_dir: Path | str) -> dict[int, _Shard]:
    """The done shards of a run directory and where their rows are, read without changing anything
    (what a progress monitor or a test watching a run calls)."""
    parts_dir = Path(out_dir) / "parts"
    while True:  # a writer sealing a part while this reads removes files under it: read again
        try:
            return _scan(parts_dir) if parts_dir.is_dir() else {}
        except FileNotFoundError:
            continue


def _scan(parts_dir: Path) -> dict[int, _Shard]:
    import pyarrow.parquet as pq

    found: dict[int, _Shard] = {}
    for path in sorted(parts_dir.iterdir()):
        if _PART.fullmatch(path.name):
            meta = pq.read_schema(path).metadata or {}
            first, last = json.loads(meta[b"rmjax.shards"])
            counts, skipped = json.loads(meta[b"rmjax.shard_rows"]), json.loads(meta[b"rmjax.shard_skipped"])
            for k in range(first, last + 1):
                found[k] = _Shard(path, -1, 0, counts[k - first], skipped[k - first])
        elif (m := _OPEN.fullmatch(path.name)) and m.group(2) == "rows":
            index = path.with_suffix(".index")
            for e in _index_entries(index, path.stat().st_size)[0]:
                found.setdefault(e["shard"], _Shard(path, e["offset"], e["length"], e["rows"], e["skipped"]))
    return found


def read_shard(out_dir: Path | str, shard: int):
    """The rows of a done shard of an unfinished run (an Arrow table), wherever they are."""
    import pyarrow.parquet as pq

    found = scan_shards(out_dir).get(shard)
    if found is None:
        raise DataError(f"{Path(out_dir) / 'parts'}: shard {shard} is not scored yet; resume the run")
    if found.offset >= 0:
        return _blob_table(found.path, found.offset, found.length)
    meta = pq.read_schema(found.path).metadata
    first, counts = json.loads(meta[b"rmjax.shards"])[0], json.loads(meta[b"rmjax.shard_rows"])
    table = pq.read_table(found.path).replace_schema_metadata(None)  # a part: bounded by part_rows
    return table.slice(sum(counts[:shard - first]), counts[shard - first])


class RunWriter:
    """Writes the rows of ``rmjax score`` shard by shard into ``out_dir`` (layout: module docstring).

    ``settings`` (JSON-serialisable, with at least REQUIRED_SETTINGS) identify the run: re-opening
    an ``out_dir`` whose metadata.json has other settings, example count, shard size or token
    option raises RmjaxError unless ``overwrite``, which deletes only the writer's own files.
    ``part_rows``: rows per sealed part (storage only; a run may resume with another value).
    ``tidy``: remove what a killed run left (torn tails, temporary files); the first process to open.
    A subclass with other ``FORMAT`` / ``REQUIRED`` / ``TABLE`` / ``WHAT`` writes another kind of
    resumable run the same way (``rmjax.scoring.features.FeatureWriter``).
    """

    FORMAT = FORMAT
    REQUIRED = REQUIRED_SETTINGS
    TABLE = "scores.parquet"  # the finalized table
    WHAT = "rmjax score run"
    ROW_GROUP = 65_536  # rows per row group of the finalized table

    def __init__(self, out_dir: Path | str, settings: dict, *, num_examples: int, shard_size: int = 256,
                 token_logprobs: bool = False, overwrite: bool = False, part_rows: int = PART_ROWS,
                 tidy: bool = True):
        if num_examples < 0 or shard_size < 1 or part_rows < 1:
            raise ConfigError(f"need num_examples >= 0, shard_size >= 1 and part_rows >= 1, got {num_examples}, "
                              f"{shard_size} and {part_rows}")
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
        self.part_rows = part_rows
        self.num_shards = -(-num_examples // shard_size)
        self._open: _Open | None = None
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
            if self._owned_parts() or self.tokens.shards() or self.scores_path.exists():
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
        if tidy:
            self._remove_leftovers()
        self._done = scan_shards(self.out_dir)

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

    def _owned_parts(self) -> list[Path]:
        """The writer's files in parts/: sealed parts, open parts and their temporary files."""
        if not self.parts_dir.is_dir():
            return []
        return [p for p in self.parts_dir.iterdir()
                if _PART.fullmatch(p.name) or _OPEN.fullmatch(p.name) or _TEMP.fullmatch(p.name)]

    def _delete_owned(self) -> None:
        """Remove the previous run's files by their exact names; other files in the tree are kept."""
        self.scores_path.unlink(missing_ok=True)
        for path in self._owned_parts():
            path.unlink()
        _remove_if_empty(self.parts_dir)
        for shard in self.tokens.shards():
            self.tokens.remove_shard(shard)
        (self.tokens.root / ".zgroup").unlink(missing_ok=True)
        _remove_if_empty(self.tokens.root)
        self._remove_leftovers()
        self.metadata_path.unlink(missing_ok=True)  # last: until here the directory still names its run

    def _remove_leftovers(self) -> None:
        """What a killed run leaves: temporary files, torn tails of open parts, an open part whose
        sealed copy was written, parts of a finalized run, token arrays of shards not done."""
        for folder in (self.out_dir, self.parts_dir, self.tokens.root):
            if folder.is_dir():
                for path in folder.iterdir():
                    if _TEMP.fullmatch(path.name) and path.is_file():
                        path.unlink()
        if self.parts_dir.is_dir():
            if self._finalized():
                for path in self._owned_parts():  # the finalized table holds them
                    path.unlink()
            sealed = {int(m.group(1)) for p in self.parts_dir.iterdir() if (m := _PART.fullmatch(p.name))}
            for first in sorted({int(m.group(1)) for p in self.parts_dir.iterdir() if (m := _OPEN.fullmatch(p.name))}):
                data, index = _open_paths(self.parts_dir, first)
                entries, used = _index_entries(index, data.stat().st_size) if data.exists() else ([], 0)
                if first in sealed or not entries:
                    data.unlink(missing_ok=True)
                    index.unlink(missing_ok=True)
                    continue
                end = entries[-1]["offset"] + entries[-1]["length"]
                for path, size in ((index, used), (data, end)):
                    if path.stat().st_size != size:
                        os.truncate(path, size)
                        fsync_path(path)
        done = set(range(self.num_shards)) if self._finalized() else set(scan_shards(self.out_dir))
        for shard in self.tokens.shards() - done:
            self.tokens.remove_shard(shard)

    # -- shards

    def shard_range(self, shard: int) -> range:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range: this run has shards 0..{self.num_shards - 1}")
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_examples))

    def _finalized(self) -> bool:
        return getattr(self, "metadata", {}).get("status") == "complete"

    def completed_shards(self) -> set[int]:
        """The shards done, by any process writing this directory (read from the files; every shard
        of a finalized run)."""
        if self._finalized():
            return set(range(self.num_shards))
        self._done = scan_shards(self.out_dir)
        return set(self._done)

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
        Returns the file that holds the shard now.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        expected = self.shard_range(shard)
        if shard in self._done:
            raise RmjaxError(f"{self.parts_dir}: shard {shard} is already written; is another run using "
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
        sink = pa.BufferOutputStream()
        pq.write_table(_rows_table(rows, shard), sink)
        blob = sink.getvalue().to_pybytes()
        part = self._open
        if part is not None and (shard != part.last + 1 or part.rows >= self.part_rows):
            self._seal(part)
            part = None
        if part is None:
            part = self._open = _Open(self.parts_dir, shard)
        offset = part.data.stat().st_size if part.data.exists() else 0
        entry = {"shard": shard, "offset": offset, "length": len(blob), "rows": len(rows),
                 "skipped": {str(k): v for k, v in sorted(skipped.items())}}
        _append(part.data, blob)  # the bytes first, then the line that names the shard done
        _append(part.index, (json.dumps(entry, sort_keys=True) + "\n").encode())
        if offset == 0:
            fsync_path(self.parts_dir)
        part.entries.append(entry)
        part.last, part.rows = shard, part.rows + len(rows)
        self._done[shard] = _Shard(part.data, offset, len(blob), len(rows), entry["skipped"])
        if part.rows >= self.part_rows:
            self._seal(part)
        return part.data if self._open is part else self._sealed_path(part.first)

    def _sealed_path(self, first: int) -> Path:
        return self.parts_dir / f"part-{first:05d}.parquet"

    def _seal(self, part: _Open) -> None:
        """The open part as one Parquet file (its shards' rows in order), then the open files removed."""
        import pyarrow.parquet as pq

        tables = [_blob_table(part.data, e["offset"], e["length"]) for e in part.entries]
        table = _concat(tables)
        table = table.replace_schema_metadata({
            "rmjax.shards": json.dumps([part.first, part.last]),
            "rmjax.shard_rows": json.dumps([e["rows"] for e in part.entries]),
            "rmjax.shard_skipped": json.dumps([e["skipped"] for e in part.entries], sort_keys=True)})
        path = self._sealed_path(part.first)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=self.ROW_GROUP))
        part.index.unlink()
        part.data.unlink()
        for e in part.entries:
            self._done[e["shard"]] = _Shard(path, -1, 0, e["rows"], e["skipped"])
        if self._open is part:
            self._open = None

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

    def finalize(self, extra_metadata: Mapping[str, Any] | None = None,
                 summarise: Callable[[Path], Mapping[str, Any]] | None = None) -> Path:
        """Stream every part into the table (``index`` order; memory bounded by a row group and a
        part's footer, not by the corpus), mark the run complete, then remove the parts.

        ``summarise(table_path)``: extra metadata computed from the written table (e.g. accuracies),
        recorded with ``extra_metadata`` in the same write that marks the run complete."""
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
        if self._open is not None:
            self._seal(self._open)  # it moves its shards' locations in self._done (scanned by pending_shards)
        done = self._done
        skipped = {int(i): r for k in range(self.num_shards) for i, r in done[k].skipped.items()}
        schema = self._table_schema(done)
        scored, last = 0, -1

        def write(tmp: Path) -> None:
            nonlocal scored, last
            buffered: list = []
            with pq.ParquetWriter(tmp, schema) as out:
                def flush():
                    if buffered:
                        out.write_table(pa.concat_tables(buffered), row_group_size=self.ROW_GROUP)
                        buffered.clear()
                for table in self._tables_in_order(done):
                    table = _conform(table, schema)
                    index = table.column("index").to_numpy()
                    if len(index) and (index[0] <= last or np.any(np.diff(index) <= 0)):
                        raise RmjaxError(f"{self.parts_dir}: the parts repeat an index or hold rows out of order; "
                                         "delete the parts and re-run")
                    last = int(index[-1]) if len(index) else last
                    scored += len(index)
                    buffered.append(table)
                    if sum(t.num_rows for t in buffered) >= self.ROW_GROUP:
                        flush()
                flush()
            if scored + len(skipped) != self.num_examples:
                raise RmjaxError(f"{self.parts_dir}: the parts hold {scored} rows and {len(skipped)} skipped "
                                 f"examples for {self.num_examples} examples; delete the parts and re-run")

        atomic_write(self.scores_path, write)
        self.metadata.update(extra)
        if summarise is not None:
            self.metadata.update(_canonical(dict(summarise(self.scores_path)), "summary"))
        self.metadata.update({
            "status": "complete", "completed": _now(),
            "counts": {"examples": self.num_examples, "scored": scored, "skipped": len(skipped),
                       "shards": self.num_shards},
            "skipped": [{"index": i, "reason": skipped[i]} for i in sorted(skipped)],
        })
        _write_json(self.metadata_path, self.metadata)
        for path in self._owned_parts():  # the table holds every row now
            path.unlink()
        _remove_if_empty(self.parts_dir)
        return self.scores_path

    def _tables_in_order(self, done: dict[int, _Shard]):
        """Every done shard's rows as Arrow tables, shard by shard (a sealed part row group by row
        group: its shards are consecutive)."""
        import pyarrow.parquet as pq

        k = 0
        while k < self.num_shards:
            where = done[k]
            if where.offset >= 0:
                yield _blob_table(where.path, where.offset, where.length)
                k += 1
                continue
            file = pq.ParquetFile(where.path)
            first, last = json.loads(file.schema_arrow.metadata[b"rmjax.shards"])
            if first != k:
                raise RmjaxError(f"{where.path}: starts at shard {first}, expected {k}; delete the parts and re-run")
            for g in range(file.num_row_groups):
                yield file.read_row_group(g).replace_schema_metadata(None)
            k = last + 1

    def _table_schema(self, done: dict[int, _Shard]):
        """The finalized table's columns: every part's, ``index`` first, in order of appearance, types
        promoted (a column that is null in one shard and numbers in another is numbers)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schemas, seen = [], set()
        for k in sorted(done):
            where = done[k]
            key = (where.path, where.offset)
            if key in seen:
                continue
            seen.add(key)
            if where.offset < 0:
                schemas.append(pq.read_schema(where.path).remove_metadata())
            else:
                with open(where.path, "rb") as f:
                    f.seek(where.offset)
                    schemas.append(pq.read_schema(pa.BufferReader(f.read(where.length))).remove_metadata())
        if not schemas:
            return pa.schema([("index", pa.int64())])
        return pa.unify_schemas(schemas, promote_options="permissive")


def _rows_table(rows: list[dict], shard: int):
    """Rows -> Arrow table with the union of their columns, ``index`` first (missing values null)."""
    import pyarrow as pa

    columns = ["index", *dict.fromkeys(k for row in rows for k in row if k != "index")]
    try:
        return pa.table({c: [row.get(c) for row in rows] for c in columns} if rows
                        else {"index": pa.array([], pa.int64())})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"shard {shard}: a column mixes value types ({e})") from e


def _concat(tables: list):
    import pyarrow as pa

    return (pa.concat_tables(tables, promote_options="default") if tables
            else pa.table({"index": pa.array([], pa.int64())}))


def _conform(table, schema):
    """``table`` with exactly ``schema``'s columns, in its order (missing ones null), cast to its types."""
    import pyarrow as pa

    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema) if table.schema.equals(schema) else \
        pa.Table.from_arrays([c.cast(f.type) for c, f in zip(columns, schema)], schema=schema)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def read_token_logprobs(out_dir: Path | str, index: int, stream: str | None = None) -> np.ndarray:
    """The per-token log-probs of example ``index`` (``stream``: e.g. "chosen", for named streams)."""
    import pyarrow.compute as pc
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
    if meta.get("status") == "complete":
        table = pq.read_table(out_dir / "scores.parquet", filters=[("index", "==", index)])
        where = f"{out_dir / 'scores.parquet'}"
    else:
        table, where = read_shard(out_dir, shard), f"{out_dir / 'parts'} (shard {shard})"
        table = table.filter(pc.field("index") == index)
    if table.num_rows == 0:
        raise DataError(f"{where}: example {index} has no row; it was skipped (see metadata.json 'skipped')")
    row = table.to_pylist()[0]
    offset_col, count_col = _token_columns(stream)
    if row.get(offset_col) is None:
        streams = sorted(k.removeprefix("token_offset_") for k, v in row.items()
                         if k.startswith("token_offset_") and v is not None)
        has_plain = row.get("token_offset") is not None
        raise DataError(f"{where}: example {index} has no token stream {stream!r}; it has "
                        f"{(['None'] if has_plain else []) + streams}")
    return TokenLogprobWriter(out_dir / "tokens.zarr").read(row["token_shard"], row[offset_col], row[count_col])
