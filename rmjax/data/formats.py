"""Where records come from: files, ``datasets`` directories and the bundled sets, each row with its place.

    ``*.jsonl`` / ``*.jsonl.gz``  one JSON object per line (places are ``file:line``, 1-based)
    ``*.parquet``                 one record per row (places are ``file row N``, 0-based)
    a directory                   saved with ``datasets.Dataset.save_to_disk``; a ``DatasetDict``
                                  needs ``split`` (places are ``dir row N`` / ``dir[split] row N``)
    ``hh-rlhf`` / ``hh-rlhf:SUBSET[,SUBSET]``  the bundled HH-RLHF test pairs; SUBSET is a subset
                                  (``helpful-base``, ...) or a source (``helpful``, ``harmless``, ``both``)
    ``llmbar`` / ``llmbar:SUBSET[,SUBSET]``    the bundled LLMBar pairs (``Natural``, ``Adversarial_Neighbor``, ...)

Every row of a bundled set carries its subset (field ``subset``). ``input_fingerprint`` hashes the
bytes an input reads, so a resumed job can check it reads the same data.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rmjax.data.preferences import HH_SOURCES, HH_SUBSETS, LLMBAR_SUBSETS, bundled_path
from rmjax.errors import DataError

HH_ALIAS = "hh-rlhf"
LLMBAR_ALIAS = "llmbar"
Row = tuple[str, str, "dict | DataError"]  # (place, default id, record or the error for that place)
IndexedRow = tuple[int, str, str, "dict | DataError"]  # (unit, place, default id, record or error)


Part = tuple[int, int]  # units [lo, hi) of an input (see ``row_count``)


def _opener(path: Path):
    return gzip.open if path.suffix == ".gz" else open


def _json_line(where: str, raw: bytes) -> dict | DataError:
    """One line's record, or the error for that line (non-UTF-8, malformed JSON, not an object)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        return DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _raw_lines(path: Path, part: Part | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the non-blank lines lo+1..hi (1-based), none of them decoded."""
    lo, hi = part if part is not None else (0, None)
    with _opener(path)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno <= lo:
                continue
            if hi is not None and lineno > hi:
                break
            if raw.strip():
                yield lineno, raw


def read_jsonl(path: Path, part: Part | None = None) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, record or the error for that line); gzip by suffix; non-UTF-8 is an error.
    ``part=(lo, hi)``: only lines lo+1..hi (1-based); the lines before are skipped unparsed."""
    for lineno, raw in _raw_lines(path, part):
        yield lineno, _json_line(f"{path}:{lineno}", raw)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".parquet"):
        name = name.removesuffix(suffix)
    return name


def _jsonl_lines(path: Path) -> int:
    """Lines of a jsonl file as ``read_jsonl`` numbers them, counted without decoding any."""
    lines, last = 0, b"\n"
    try:
        with _opener(path)(path, "rb") as f:
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, EOFError) as e:
        raise _unreadable(path, e) from e
    return lines + (last != b"\n")


def _unreadable(path: Path, e: Exception) -> DataError:  # a truncated or non-gzip .gz file
    return DataError(f"{path}: cannot be read ({e}); check that the file is complete")


def _jsonl_row(path: Path, stem: str, lineno: int, raw: bytes) -> IndexedRow:
    rec = _json_line(f"{path}:{lineno}", raw)
    if isinstance(rec, DataError):
        rec = DataError(f"{rec}; fix or delete that line")
    return lineno - 1, f"{path}:{lineno}", f"{stem}:{lineno}", rec


def _jsonl_rows(path: Path, part: Part | None = None) -> Iterator[IndexedRow]:
    stem = _stem(path)
    try:
        for lineno, raw in _raw_lines(path, part):
            yield _jsonl_row(path, stem, lineno, raw)
    except (OSError, EOFError) as e:
        raise _unreadable(path, e) from e


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); rewrite it, e.g. with pandas.to_parquet") from e


def _parquet_rows(path: Path, part: Part | None = None) -> Iterator[IndexedRow]:
    """Rows of a Parquet file; ``part`` reads only the row groups that hold rows lo..hi-1."""
    import pyarrow as pa

    stem = _stem(path)
    file = _parquet_file(path)
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
    lo, hi = part if part is not None else (0, sum(sizes))
    starts = [0, *itertools.accumulate(sizes)][:-1]
    groups = [g for g in range(len(sizes)) if starts[g] < hi and starts[g] + sizes[g] > lo]
    try:
        row = starts[groups[0]] if groups else 0
        for batch in file.iter_batches(batch_size=1024, row_groups=groups) if groups else ():
            for rec in batch.to_pylist():
                if lo <= row < hi:
                    yield row, f"{path} row {row}", f"{stem}:{row}", rec
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); rewrite it, e.g. with pandas.to_parquet") from e


def _load_dataset(path: Path, split: str | None):
    """(the Dataset, its place name)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a datasets directory ({e}); save it with Dataset.save_to_disk") from e
    place = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            got = "no split was given" if split is None else f"split {split!r} is not there"
            raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)} and {got}; choose one with --split")
        ds, place = ds[split], f"{path}[{split}]"
    elif split is not None:
        raise DataError(f"{path}: a single Dataset has no splits, but split {split!r} was given; drop --split")
    return ds, place


def _datasets_rows(path: Path, split: str | None, part: Part | None = None) -> Iterator[IndexedRow]:
    ds, place = _load_dataset(path, split)
    row = 0
    if part is not None:
        ds, row = ds.select(range(part[0], min(part[1], len(ds)))), part[0]
    for batch in ds.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield row, f"{place} row {row}", f"{path.name}:{row}", dict(zip(columns, values))
            row += 1


def _alias_names(spec: str, known: tuple[str, ...], groups: dict[str, tuple[str, ...]], what: str) -> list[str]:
    names = spec.partition(":")[2]
    subsets: list[str] = []
    for name in (n.strip() for n in names.split(",")) if names else list(groups.get("all", known)):
        if name in groups:
            subsets += groups[name]
        elif name in known:
            subsets.append(name)
        else:
            extra = f" or a source {list(groups)}" if groups else ""
            raise DataError(f"{spec}: unknown {what} subset {name!r}; use one of {list(known)}{extra}")
    return list(dict.fromkeys(subsets))


def bundled_files(spec: str) -> list[tuple[str, Path]]:
    """``hh-rlhf[:SUBSETS]`` or ``llmbar[:SUBSETS]`` -> [(subset, bundled file)]."""
    if spec.partition(":")[0] == LLMBAR_ALIAS:
        root = bundled_path("llmbar")
        return [(s, root / f"LLMBar_{s}.json") for s in _alias_names(spec, LLMBAR_SUBSETS, {}, "LLMBar")]
    root = bundled_path("hh_rlhf")
    subsets = _alias_names(spec, HH_SUBSETS, {**HH_SOURCES, "all": HH_SOURCES["both"]}, "HH-RLHF")
    return [(s, root / f"{s}_test.jsonl.gz") for s in subsets]


def is_bundled(path: str | Path) -> bool:
    text = str(path)
    return (any(text == a or text.startswith(a + ":") for a in (HH_ALIAS, LLMBAR_ALIAS))
            and not Path(text).exists())


def _llmbar_rows(subset: str, path: Path) -> Iterator[Row]:
    """LLMBar items as pairs: ``label`` 1 or 2 names the preferred of ``output_1`` / ``output_2``."""
    for i, rec in enumerate(json.loads(path.read_text("utf-8"))):
        where = f"{path} item {i}"
        if not isinstance(rec, dict) or rec.get("label") not in (1, 2):
            yield where, f"{subset}:{i}", DataError(f"{where}: field 'label' must be 1 or 2")
            continue
        good, bad = ("output_1", "output_2") if rec["label"] == 1 else ("output_2", "output_1")
        yield where, f"{subset}:{i}", {"prompt": rec.get("input"), "chosen": rec.get(good),
                                       "rejected": rec.get(bad), "subset": subset}


def _bundled_rows(spec: str) -> Iterator[Row]:
    for subset, file in bundled_files(spec):
        if file.suffix == ".json":
            yield from _llmbar_rows(subset, file)
            continue
        for _, where, default_id, rec in _jsonl_rows(file):
            if isinstance(rec, dict):
                rec = {**rec, "subset": subset}
            yield where, f"{subset}:{default_id.rpartition(':')[2]}", rec


def _source(path: str | Path, split: str | None) -> tuple[str, Any]:
    """(kind, path): "bundled", "datasets", "jsonl" or "parquet"; errors for anything else."""
    if is_bundled(path):
        if split is not None:
            raise DataError(f"{path}: the bundled data has one split; drop --split")
        return "bundled", str(path)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; give a .jsonl, .jsonl.gz or .parquet file, "
                        f"a datasets directory, {HH_ALIAS}[:SUBSET] or {LLMBAR_ALIAS}[:SUBSET]")
    if path.is_dir():
        return "datasets", path
    if split is not None:
        raise DataError(f"{path}: --split applies only to a datasets directory; drop it")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl", path
    if path.suffix == ".parquet":
        return "parquet", path
    raise DataError(f"{path}: unknown input format; use .jsonl, .jsonl.gz, .parquet, a datasets directory "
                    f"(save_to_disk), {HH_ALIAS}[:SUBSET] or {LLMBAR_ALIAS}[:SUBSET]")


def row_count(path: str | Path, split: str | None = None) -> int:
    """How many units ``rows(path, split, part)`` splits: the lines of a jsonl file (blank ones too;
    counted, not parsed), the rows of a Parquet file (its metadata) or a dataset, the rows of a
    bundled set (small; read whole)."""
    kind, src = _source(path, split)
    if kind == "jsonl":
        return _jsonl_lines(src)
    if kind == "parquet":
        return _parquet_file(src).metadata.num_rows
    if kind == "datasets":
        return len(_load_dataset(src, split)[0])
    return sum(1 for _ in _bundled_rows(src))


def indexed_rows(path: str | Path, split: str | None, part: Part | None = None) -> Iterator[IndexedRow]:
    """(unit, place, default id, record or error) of every row of ``path``, in input order; ``part=(lo,
    hi)`` only those of units lo..hi-1 (``row_count``), reading no more of the input than it must. A
    row's unit is its position among the units: the line (0-based) of a jsonl file, the row of the
    others."""
    kind, src = _source(path, split)
    if kind == "jsonl":
        yield from _jsonl_rows(src, part)
    elif kind == "parquet":
        yield from _parquet_rows(src, part)
    elif kind == "datasets":
        yield from _datasets_rows(src, split, part)
    else:
        for i, row in enumerate(_bundled_rows(src)):
            if part is None or part[0] <= i < part[1]:
                yield (i, *row)
            elif part is not None and i >= part[1]:
                break


def rows(path: str | Path, split: str | None, part: Part | None = None) -> Iterator[Row]:
    """(place, default id, record or error) of every row of ``path``, in input order; ``part=(lo, hi)``
    only those of units lo..hi-1 (``row_count``), reading no more of the input than it must."""
    for _, *row in indexed_rows(path, split, part):
        yield tuple(row)


class RowCursor:
    """The rows of an input by unit (``indexed_rows``), read forward: asking for a unit at or after the
    last one asked for goes on reading from there, only an earlier one opens the input again (a
    gzip file is then decompressed from its start; a Parquet file reads from the row group that
    holds the unit). The lines of a jsonl file that are passed over are not decoded. A datasets
    directory and the bundled sets go through ``indexed_rows`` the same way (the bundled sets are
    small and read from their start on each opening)."""

    def __init__(self, path: str | Path, split: str | None = None):
        self.kind, self.src = _source(path, split)
        self.path, self.split = path, split
        self.openings = 0  # how often the input was opened
        self._it: Iterator | None = None
        self._next = 0  # the first unit the open reading has not passed

    def _open(self, unit: int) -> None:
        self.close()
        self.openings += 1
        part = (unit, sys.maxsize)
        self._it = (_raw_lines(self.src, part) if self.kind == "jsonl"
                    else ((row[0], row) for row in indexed_rows(self.path, self.split, part)))

    def row(self, unit: int) -> IndexedRow:
        """(unit, place, default id, record or error) of ``unit``, a unit that holds a row."""
        if self._it is None or unit < self._next:
            self._open(unit)
        try:
            for got, item in self._it:
                if self.kind == "jsonl":
                    got -= 1
                self._next = got + 1
                if got == unit:
                    return _jsonl_row(self.src, _stem(self.src), got + 1, item) if self.kind == "jsonl" else item
                if got > unit:
                    break
        except (OSError, EOFError) as e:
            raise _unreadable(self.src, e) from e
        self._next = sys.maxsize  # passed or exhausted: the next request opens the input again
        raise DataError(f"{self.path}: unit {unit} holds no row now, but it held one when the input was "
                        "first read; the input changed while it was read")

    def close(self) -> None:
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it, self._next = None, 0


# ---------------------------------------------------------------- fingerprint

def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(io.DEFAULT_BUFFER_SIZE * 64):
            digest.update(chunk)


def input_fingerprint(path: str | Path) -> str:
    """sha256 hex digest of the input's bytes, to check that a resumed run reads the same data.

    A file: its bytes (equal to ``sha256sum``). A datasets directory: the relative names and bytes
    of its ``*.arrow``, ``state.json`` and ``dataset_dict.json`` files. ``hh-rlhf[:SUBSET]``: the
    names and bytes of the bundled files it reads (``llmbar`` alike).
    """
    digest = hashlib.sha256()
    if is_bundled(path):
        files = [(f"{file.parent.name}/{file.name}", file) for _, file in bundled_files(str(path))]
    else:
        path = Path(path)
        if path.is_file():
            _hash_file(digest, path)
            return digest.hexdigest()
        if not path.is_dir():
            raise DataError(f"{path}: no such file or directory; cannot fingerprint the input")
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file() and (
            p.suffix == ".arrow" or p.name in ("state.json", "dataset_dict.json")))
        if not files:
            raise DataError(f"{path}: no .arrow or state.json files; is it a directory saved with save_to_disk?")
    for name, file in files:
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        _hash_file(digest, file)
    return digest.hexdigest()
