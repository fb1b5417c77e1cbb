"""Examples to score: one prompt with one response, or a prompt with a (chosen, rejected) pair.

Inputs
    ``*.jsonl`` / ``*.jsonl.gz``  one JSON object per line (places are ``file:line``, 1-based)
    ``*.parquet``                 one record per row (places are ``file row N``, 0-based)
    a directory                   saved with ``datasets.Dataset.save_to_disk``; a ``DatasetDict``
                                  needs ``split`` (places are ``dir row N`` / ``dir[split] row N``)
    ``hh-rlhf`` / ``hh-rlhf:SUBSET[,SUBSET]``  the bundled HH-RLHF test pairs; SUBSET is a subset
                                  (``helpful-base``, ...) or a source (``helpful``, ``harmless``, ``both``)

Record layouts, detected per record (fields that are null count as absent, extra fields are kept
out of the way; a message is ``{"role": "system" | "user" | "assistant", "content": str}``):
    a. ``{"prompt": str | messages, "response": str}``                   -> single
    b. ``{"messages": [...]}`` ending in an assistant turn              -> single; that turn is the response
    c. ``{"prompt": str | messages, "chosen": R, "rejected": R}``         -> pair; R is a string, one
       assistant message, or the whole conversation (the prompt's turns, then one assistant turn)
    d. ``{"chosen": str, "rejected": str}``, HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")
       that share every turn but the last reply                         -> pair; the shared turns are the prompt
    e. ``{"chosen": messages, "rejected": messages}`` sharing every turn but the last -> pair

A string prompt becomes one user turn; an empty one means no prompt turns (raw-text scoring).
A non-empty prompt must end with a user turn. Empty or whitespace-only responses are errors: there
is nothing to score. Ids come from ``id_field`` (string or integer, unique) or default to
``<file stem>:<line or row>``. ``records[i].index == i``: the order of the input, skipped records
left out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rmjax.data.preferences import HH_SOURCES, HH_SUBSETS, LoadReport, bundled_path, parse_hh_transcript, read_jsonl
from rmjax.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
HH_ALIAS = "hh-rlhf"
LAYOUTS = ('{"prompt", "response"}; {"messages"} ending in an assistant turn; '
           '{"prompt", "chosen", "rejected"}; {"chosen", "rejected"} as HH-RLHF transcripts '
           "or as message lists sharing all but the last turn")
Turns = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class ScoringRecord:
    id: str
    prompt: Turns  # (role, content) turns ending with a user turn; empty for raw text
    responses: tuple[str, ...]  # one response, or (chosen, rejected)
    kind: str  # "single" | "pair"
    index: int  # position among the records read: the output order

    @property
    def prompt_messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    @property
    def response_names(self) -> tuple[str, ...]:
        return ("chosen", "rejected") if self.kind == "pair" else ("response",)


class RecordReport(LoadReport):
    """Records read, and each skipped record's error (its place, field and fix)."""

    def summary(self) -> str:
        s = f"{self.read} records read"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return s


# ---------------------------------------------------------------- one record -> prompt + responses

def _present(record: dict, field: str) -> bool:
    return record.get(field) is not None


def _messages(value: Any, field: str, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a string or a list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__}")
    turns = []
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field {name!r} must be a {{'role', 'content'}} object, "
                            f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field '{name}.role' is {role!r}; use one of {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{name}.content' must be a string, got {type(content).__name__}")
        turns.append((role, content))
    return turns


def _prompt(value: Any, field: str, where: str) -> Turns:
    if isinstance(value, str):
        return (("user", value),) if value.strip() else ()
    turns = _messages(value, field, where)
    if turns and turns[-1][0] != "user":
        raise DataError(f"{where}: field {field!r} ends with a turn of role {turns[-1][0]!r}; a prompt must "
                        "end with a user turn (put a final assistant turn in the response field)")
    return tuple(turns)


def _response(text: Any, field: str, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: field {field!r} is empty; there is nothing to score, so give the "
                        "response text or remove the record")
    return text


def _split_last_reply(turns: list[tuple[str, str]], field: str, where: str, transcript: bool = False
                      ) -> tuple[Turns, str]:
    if not turns or turns[-1][0] != "assistant":
        raise DataError(f"{where}: field {field!r} must end with an assistant turn (the response to score)")
    prompt = tuple(turns[:-1])
    if prompt and prompt[-1][0] != "user":
        raise DataError(f"{where}: in field {field!r} the turn before the final reply has role {prompt[-1][0]!r}; "
                        "it must be a user turn (the response answers the user)")
    return prompt, _response(turns[-1][1], field if transcript else f"{field}[{len(turns) - 1}].content", where)


def _pair_reply(value: Any, field: str, prompt: Turns, where: str) -> str:
    """Layout c: a reply given as text, one assistant message, or the prompt's turns + the reply."""
    if isinstance(value, str):
        return _response(value, field, where)
    turns = _messages(value, field, where)
    before, reply = _split_last_reply(turns, field, where)
    if before and before != prompt:
        raise DataError(f"{where}: the turns of field {field!r} before its last reply differ from field "
                        "'prompt'; give only the reply, or the prompt's exact turns followed by the reply")
    return reply


def _shared_prompt(chosen: list[tuple[str, str]], rejected: list[tuple[str, str]], where: str,
                   transcript: bool) -> tuple[Turns, str, str]:
    prompt, good = _split_last_reply(chosen, "chosen", where, transcript)
    other, bad = _split_last_reply(rejected, "rejected", where, transcript)
    if prompt != other:
        diff = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ at turn {diff}, before the last reply, "
                        "so they share no prompt; both must repeat the same conversation and differ only in "
                        "the final assistant reply")
    return prompt, good, bad


def parse_record(record: dict, where: str) -> tuple[Turns, tuple[str, ...], str]:
    """(prompt, responses, kind) of one record in any accepted layout; DataError naming ``where``."""
    layout_fields = [f for f in ("response", "messages", "chosen") if _present(record, f)]
    if len(layout_fields) > 1:
        raise DataError(f"{where}: fields {layout_fields} belong to different layouts, so the response to score "
                        f"is ambiguous; keep one of them (accepted layouts: {LAYOUTS})")
    if _present(record, "chosen") or _present(record, "rejected"):
        for field in ("chosen", "rejected"):
            if not _present(record, field):
                raise DataError(f"{where}: field {field!r} is missing; a pair needs both 'chosen' and 'rejected'")
        chosen, rejected = record["chosen"], record["rejected"]
        if _present(record, "prompt"):  # layout c
            prompt = _prompt(record["prompt"], "prompt", where)
            return prompt, (_pair_reply(chosen, "chosen", prompt, where),
                            _pair_reply(rejected, "rejected", prompt, where)), "pair"
        if isinstance(chosen, str) and isinstance(rejected, str):  # layout d
            turns = [parse_hh_transcript(text, f"{where}: field {field!r}")
                     for field, text in (("chosen", chosen), ("rejected", rejected))]
        elif isinstance(chosen, list) and isinstance(rejected, list):  # layout e
            turns = [_messages(chosen, "chosen", where), _messages(rejected, "rejected", where)]
        else:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be HH-RLHF transcript strings "
                            f"or both message lists (got {type(chosen).__name__} and {type(rejected).__name__}); "
                            "or add a 'prompt' field")
        prompt, good, bad = _shared_prompt(*turns, where, transcript=isinstance(chosen, str))
        return prompt, (good, bad), "pair"
    if _present(record, "response"):  # layout a
        if not _present(record, "prompt"):
            raise DataError(f"{where}: field 'prompt' is missing; a response is scored given its prompt "
                            "(use \"\" for raw text)")
        return (_prompt(record["prompt"], "prompt", where),
                (_response(record["response"], "response", where),), "single")
    if _present(record, "messages"):  # layout b
        prompt, reply = _split_last_reply(_messages(record["messages"], "messages", where), "messages", where)
        return prompt, (reply,), "single"
    fields = sorted(k for k, v in record.items() if v is not None)
    raise DataError(f"{where}: the record matches no layout (its fields: {fields}); accepted layouts: {LAYOUTS}")


# ---------------------------------------------------------------- sources: (place, default id, record)

def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".parquet"):
        name = name.removesuffix(suffix)
    return name


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, dict | DataError]]:
    stem = _stem(path)
    try:
        for lineno, rec in read_jsonl(path):
            if isinstance(rec, DataError):
                rec = DataError(f"{rec}; fix or delete that line")
            yield f"{path}:{lineno}", f"{stem}:{lineno}", rec
    except (OSError, EOFError) as e:  # a truncated or non-gzip .gz file
        raise DataError(f"{path}: cannot be read ({e}); check that the file is complete") from e


def _parquet_rows(path: Path) -> Iterator[tuple[str, str, dict | DataError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = _stem(path)
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for rec in batch.to_pylist():
                yield f"{path} row {row}", f"{stem}:{row}", rec
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); rewrite it, e.g. with pandas.to_parquet") from e


def _datasets_rows(path: Path, split: str | None) -> Iterator[tuple[str, str, dict | DataError]]:
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
    row = 0
    for batch in ds.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield f"{place} row {row}", f"{path.name}:{row}", dict(zip(columns, values))
            row += 1


def hh_alias_files(spec: str) -> list[tuple[str, Path]]:
    """``hh-rlhf[:SUBSET[,SUBSET]]`` -> [(subset, bundled file)]."""
    names = spec.partition(":")[2]
    subsets: list[str] = []
    for name in (n.strip() for n in names.split(",")) if names else ["both"]:
        if name in HH_SOURCES:
            subsets += HH_SOURCES[name]
        elif name in HH_SUBSETS:
            subsets.append(name)
        else:
            raise DataError(f"{spec}: unknown HH-RLHF subset {name!r}; use one of {list(HH_SUBSETS)} "
                            f"or a source {list(HH_SOURCES)}")
    root = bundled_path("hh_rlhf")
    return [(s, root / f"{s}_test.jsonl.gz") for s in dict.fromkeys(subsets)]


def _is_hh_alias(path: str | Path) -> bool:
    text = str(path)
    return (text == HH_ALIAS or text.startswith(HH_ALIAS + ":")) and not Path(text).exists()


def _rows(path: str | Path, split: str | None) -> Iterator[tuple[str, str, dict | DataError]]:
    if _is_hh_alias(path):
        if split is not None:
            raise DataError(f"{path}: the bundled HH-RLHF data has only its test split; drop --split")
        for subset, file in hh_alias_files(str(path)):
            for where, default_id, rec in _jsonl_rows(file):
                yield where, f"{subset}:{default_id.rpartition(':')[2]}", rec
        return
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; give a .jsonl, .jsonl.gz or .parquet file, "
                        f"a datasets directory, or {HH_ALIAS}[:SUBSET]")
    if path.is_dir():
        yield from _datasets_rows(path, split)
        return
    if split is not None:
        raise DataError(f"{path}: --split applies only to a datasets directory; drop it")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(f"{path}: unknown input format; use .jsonl, .jsonl.gz, .parquet, a datasets directory "
                        f"(save_to_disk) or {HH_ALIAS}[:SUBSET]")


def _record_id(record: dict, id_field: str, default: str, where: str) -> str:
    value = record.get(id_field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {id_field!r} must be a string or an integer id, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {id_field!r} is empty; give a unique id or leave the field out")
    return str(value)


def read_records(path: str | Path, *, on_error: str = "fail", report: RecordReport | None = None,
                 limit: int | None = None, id_field: str = "id", split: str | None = None) -> list[ScoringRecord]:
    """The records of ``path`` in input order (see the module docstring for inputs and layouts).

    ``on_error="fail"`` raises the first bad record's DataError; ``"skip"`` leaves it out and adds the
    error to ``report.skipped``. ``limit`` stops after that many records were read. Errors about the
    input as a whole (missing file, unreadable Parquet, a DatasetDict without ``split``) always raise.
    """
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    report = report if report is not None else RecordReport()
    records: list[ScoringRecord] = []
    first_seen: dict[str, str] = {}  # id -> place of the record that has it
    for where, default_id, rec in _rows(path, split):
        if limit is not None and len(records) >= limit:
            break
        try:
            if isinstance(rec, DataError):
                raise rec
            record_id = _record_id(rec, id_field, default_id, where)
            if record_id in first_seen:
                raise DataError(f"{where}: duplicate id {record_id!r} (first at {first_seen[record_id]}); "
                                f"ids in field {id_field!r} must be unique, so fix one of them")
            prompt, responses, kind = parse_record(rec, where)
        except DataError as e:
            if on_error == "fail":
                raise
            report.skipped.append(str(e))
            continue
        first_seen[record_id] = where
        records.append(ScoringRecord(record_id, prompt, responses, kind, len(records)))
        report.read += 1
    return records


# ---------------------------------------------------------------- fingerprint

def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(io.DEFAULT_BUFFER_SIZE * 64):
            digest.update(chunk)


def input_fingerprint(path: str | Path) -> str:
    """sha256 hex digest of the input's bytes, to check that a resumed run reads the same data.

    A file: its bytes (equal to ``sha256sum``). A datasets directory: the relative names and bytes
    of its ``*.arrow``, ``state.json`` and ``dataset_dict.json`` files. ``hh-rlhf[:SUBSET]``: the
    names and bytes of the bundled files it reads.
    """
    digest = hashlib.sha256()
    if _is_hh_alias(path):
        files = [(f"hh_rlhf/{file.name}", file) for _, file in hh_alias_files(str(path))]
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
