"""Records: the ONE type for every example that rmjax scores, trains on or evaluates, and their reader.

Inputs (``rmjax.data.formats``): jsonl / jsonl.gz / parquet / a ``datasets`` directory, or the
bundled ``hh-rlhf[:SUBSETS]`` and ``llmbar[:SUBSETS]``.

Record layouts, detected per record (fields that are null count as absent, extra fields are kept
out of the way; a message is ``{"role": "system" | "user" | "assistant", "content": str}``):
    a. ``{"prompt": str | messages, "response": str}``                   -> single
    b. ``{"messages": [...]}`` ending in an assistant turn              -> single; that turn is the response
    c. ``{"prompt": str | messages, "chosen": R, "rejected": R}``         -> pair; R is a string, one
       assistant message, or the whole conversation (the prompt's turns, then one assistant turn)
    d. ``{"chosen": str, "rejected": str}``, HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")
       that share every turn but the last reply                         -> pair; the shared turns are the prompt
    e. ``{"chosen": messages, "rejected": messages}`` sharing every turn but the last -> pair
    f. ``{"prompt", "response", "ratings": {name: number | null}}``      -> single with absolute ratings
       (null = not rated: that objective is masked); every record names the same objectives
    g. ``{"prompt", "chosen": R | [R, ...], "rejected": [R, ...]}``      -> best_of_n (one of each: a pair);
       the lists' items are strings or conversations (a list of messages is layout c); several chosen
       responses are all correct (RewardBench 2: ``chosen`` is always a list, several in its Ties subset)

Optional fields of any layout: ``subset`` (a name, e.g. for per-subset accuracy; all records of an
input have one or none), ``weight`` (a number >= 0, the example's weight in a training loss) and,
for pairs and best-of-N, ``margin`` (a number: the reward gap the chosen response should win by).

Any input can be read through a column mapping ``columns={"prompt": "question", "chosen": "response_a",
...}`` (a record field -> the input's column): the mapped columns take the fields' places and the
unmapped layout fields are left out, so a ``messages`` column beside ``chosen`` / ``rejected``
(HuggingFaceH4/ultrafeedback_binarized) reads as a pair when the pair's fields are mapped; without a
mapping, a ``messages`` column equal to ``chosen`` (that dataset's own layout) is ignored. Flat rating
columns (HelpSteer2: ``helpfulness``, ``correctness``, ...) become layout f's ratings with
``ratings=("helpfulness", ...)``; read without it, a single response carrying such columns is an
error that says so (never an unrated single).

A string prompt becomes one user turn; an empty one means no prompt turns (raw-text scoring).
A non-empty prompt must end with a user turn. Empty or whitespace-only responses are errors: there
is nothing to score. Ids come from ``id_field`` (string or integer, unique) or default to
``<file stem>:<line or row>``. ``records[i].index == i``: the order of the input, skipped records
left out.
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from rmjax.data.formats import RowCursor, indexed_rows, input_fingerprint, row_count
from rmjax.errors import ConfigError, DataError

__all__ = ["Record", "RecordReport", "Share", "input_fingerprint", "parse_hh_transcript", "parse_record",
           "rating_matrix", "read_records", "read_share", "sample_positions", "sample_records"]

ROLES = ("system", "user", "assistant")
KINDS = ("single", "pair", "best_of_n")
LAYOUTS = ('{"prompt", "response"} (+ "ratings"); {"messages"} ending in an assistant turn; '
           '{"prompt", "chosen", "rejected"} (rejected may be a list: best-of-N); {"chosen", "rejected"} as '
           "HH-RLHF transcripts or as message lists sharing all but the last turn")
Turns = tuple[tuple[str, str], ...]
Ratings = tuple[tuple[str, "float | None"], ...]


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    prompt: Turns  # (role, content) turns ending with a user turn; empty for raw text
    responses: tuple[str, ...]  # single: (response,); pair: (chosen, rejected); best_of_n: (*chosen, *rejected)
    kind: str  # "single" | "pair" | "best_of_n"
    index: int  # position among the records read: the output order
    correct: int = 1  # best_of_n: how many leading responses are correct (chosen); the rest are rejected
    subset: str = ""
    margin: float | None = None
    weight: float | None = None
    ratings: Ratings | None = None  # ((objective, value or None = not rated), ...)
    place: str = dataclasses.field(default="", compare=False)  # file:line (or row) it was read from

    @property
    def prompt_messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    def to_json(self) -> dict:
        """The record in layout a / c / f / g (``read_records`` reads it back as this record)."""
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt_messages}
        if self.kind == "single":
            out["response"] = self.responses[0]
        elif self.kind == "pair":
            out["chosen"], out["rejected"] = self.responses
        else:
            k = self.correct
            out["chosen"] = self.responses[0] if k == 1 else list(self.responses[:k])
            out["rejected"] = list(self.responses[k:])
        extras = {"subset": self.subset or None, "margin": self.margin, "weight": self.weight,
                  "ratings": dict(self.ratings) if self.ratings is not None else None}
        return {**out, **{k: v for k, v in extras.items() if v is not None}}

    @property
    def response_names(self) -> tuple[str, ...]:
        if self.kind == "pair":
            return ("chosen", "rejected")
        if self.kind == "best_of_n":
            k = self.correct
            return ("chosen", *(f"chosen_{j}" for j in range(2, k + 1)),
                    *(f"rejected_{j}" for j in range(1, len(self.responses) - k + 1)))
        return ("response",)


@dataclasses.dataclass
class RecordReport:
    """Records read, and each skipped record's error (its place, field and fix)."""

    read: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.read} records read"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return s


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str, where: str = "") -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [("user", "a"), ("assistant", "b"), ...]."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


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



def _is_reply_list(value: Any) -> bool:
    """A list of replies (strings or conversations), not one conversation (a list of messages)."""
    return isinstance(value, list) and not any(isinstance(r, dict) for r in value)


def _best_of_n(record: dict, where: str) -> tuple[Turns, tuple[str, ...], str, int]:
    chosen, rejected = record["chosen"], record["rejected"]
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list) and not value:
            raise DataError(f"{where}: field {field!r} is an empty list; a best-of-N record needs at least one "
                            f"{field} response")
    if not _present(record, "prompt"):
        raise DataError(f"{where}: field 'prompt' is missing; a best-of-N record (a list of replies in "
                        "'chosen' or 'rejected') needs the prompt its responses answer")
    prompt = _prompt(record["prompt"], "prompt", where)
    chosen = chosen if _is_reply_list(chosen) else [chosen]
    rejected = rejected if _is_reply_list(rejected) else [rejected]
    responses = (*(_pair_reply(r, f"chosen[{i}]" if len(chosen) > 1 else "chosen", prompt, where)
                   for i, r in enumerate(chosen)),
                 *(_pair_reply(r, f"rejected[{i}]", prompt, where) for i, r in enumerate(rejected)))
    if len(responses) == 2:
        return prompt, responses, "pair", 1
    return prompt, responses, "best_of_n", len(chosen)


def parse_record(record: dict, where: str) -> tuple[Turns, tuple[str, ...], str, int]:
    """(prompt, responses, kind, correct) of one record in any accepted layout; DataError naming
    ``where``. ``correct``: how many leading responses are correct (best-of-N; 1 otherwise)."""
    if _present(record, "messages") and _present(record, "chosen") and record["messages"] == record["chosen"]:
        record = {k: v for k, v in record.items() if k != "messages"}  # ultrafeedback_binarized's own copy
    layout_fields = [f for f in ("response", "messages", "chosen") if _present(record, f)]
    if len(layout_fields) > 1:
        raise DataError(f"{where}: fields {layout_fields} belong to different layouts, so the response to score "
                        f"is ambiguous; map the fields to read with a column mapping (--columns "
                        f"prompt=...,chosen=...,rejected=...; data.columns in a config) or keep one of them "
                        f"(accepted layouts: {LAYOUTS})")
    if _present(record, "chosen") or _present(record, "rejected"):
        for field in ("chosen", "rejected"):
            if not _present(record, field):
                raise DataError(f"{where}: field {field!r} is missing; a pair needs both 'chosen' and 'rejected'")
        chosen, rejected = record["chosen"], record["rejected"]
        if _is_reply_list(rejected) or _is_reply_list(chosen):  # layout g
            return _best_of_n(record, where)
        if _present(record, "prompt"):  # layout c
            prompt = _prompt(record["prompt"], "prompt", where)
            return prompt, (_pair_reply(chosen, "chosen", prompt, where),
                            _pair_reply(rejected, "rejected", prompt, where)), "pair", 1
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
        return prompt, (good, bad), "pair", 1
    if _present(record, "response"):  # layout a / f
        if not _present(record, "prompt"):
            raise DataError(f"{where}: field 'prompt' is missing; a response is scored given its prompt "
                            "(use \"\" for raw text)")
        return (_prompt(record["prompt"], "prompt", where),
                (_response(record["response"], "response", where),), "single", 1)
    if _present(record, "messages"):  # layout b
        prompt, reply = _split_last_reply(_messages(record["messages"], "messages", where), "messages", where)
        return prompt, (reply,), "single", 1
    fields = sorted(k for k, v in record.items() if v is not None)
    raise DataError(f"{where}: the record matches no layout (its fields: {fields}); accepted layouts: {LAYOUTS}")


# ---------------------------------------------------------------- optional fields

def _number(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {field!r} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise DataError(f"{where}: field {field!r} is {value}; give a finite number")
    return float(value)


def _ratings(value: Any, where: str) -> Ratings:
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: field 'ratings' must be a non-empty object {{objective: number or null}}, "
                        f"got {type(value).__name__ if not isinstance(value, dict) else 'an empty object'}")
    out = []
    for name, v in value.items():
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: field 'ratings' has an empty objective name; name every objective")
        out.append((name, None if v is None else _number(v, f"ratings.{name}", where)))
    return tuple(out)


def _extras(record: dict, kind: str, where: str) -> dict:
    out: dict[str, Any] = {}
    if _present(record, "subset"):
        subset = record["subset"]
        if not isinstance(subset, str) or not subset.strip():
            raise DataError(f"{where}: field 'subset' must be a non-empty string, got {subset!r}")
        out["subset"] = subset
    if _present(record, "weight"):
        out["weight"] = _number(record["weight"], "weight", where)
        if out["weight"] < 0:
            raise DataError(f"{where}: field 'weight' is {out['weight']}; a weight must be >= 0")
    if _present(record, "margin"):
        if kind == "single":
            raise DataError(f"{where}: field 'margin' applies to pairs (the gap chosen should win by); "
                            "remove it from this single-response record")
        out["margin"] = _number(record["margin"], "margin", where)
    if _present(record, "ratings"):
        if kind != "single":
            raise DataError(f"{where}: field 'ratings' rates one response ({{\"prompt\", \"response\", "
                            "\"ratings\"}}); split this record into one record per response")
        out["ratings"] = _ratings(record["ratings"], where)
    return out


def _record_id(record: dict, id_field: str, default: str, where: str) -> str:
    value = record.get(id_field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {id_field!r} must be a string or an integer id, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {id_field!r} is empty; give a unique id or leave the field out")
    return str(value)



def record_from_dict(record: Any, index: int, where: str, id_field: str = "id") -> Record:
    """One record given as a dict (any accepted layout, as a line of a JSONL file), e.g. in a request;
    DataError naming ``where`` and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a JSON object (accepted layouts: {LAYOUTS}), got "
                        f"{type(record).__name__}")
    record_id = _record_id(record, id_field, where, where)
    prompt, responses, kind, correct = parse_record(record, where)
    return Record(record_id, prompt, responses, kind, index, correct=correct, place=where,
                  **_extras(record, kind, where))


Exchange = Any  # (what, fn) -> [fn() of every process, in process order]; see ``read_share``


def _alone(what: str, fn):
    return [fn()]


class Share:
    """One process's share of an input (``read_share``): its records, with their global indices
    ``start`` .. ``start + held - 1`` (contiguous), the size of the whole, and the rest of its last
    shard (``overhang``: records of later processes).

    ``Share(records, total, start, units, shard_size)`` holds the records it is given. A share that
    ``read_share`` returns holds only the input row of each of its records and parses those rows again
    when a shard is asked for (``shard_records``): a job that asks for its shards in increasing order
    reads its part of the input forward once. ``records`` parses every one of them into one list, for
    a caller that needs them all at once.
    """

    def __init__(self, records: list[Record] | None, total: int, start: int, units: tuple[int, int],
                 shard_size: int = 0, overhang: list[Record] | None = None, *, rows: _Rows | None = None):
        if (records is None) == (rows is None):
            raise ValueError("a share holds either its records or the input rows to read them from")
        self._records, self._rows = records, rows
        self._overhang = list(overhang or [])
        self.total = total  # records of the whole input (after skipping and sampling)
        self.start = start  # global index of the first record held (where it would be when none is)
        self.units = units  # the rows / lines lo..hi-1 it parsed (``formats.row_count``; one process: rows read)
        self.shard_size = shard_size

    def __repr__(self) -> str:
        return (f"Share(total={self.total}, start={self.start}, held={self.held}, units={self.units}, "
                f"shard_size={self.shard_size}, {'lazy' if self._rows is not None else 'in memory'})")

    @property
    def held(self) -> int:
        """How many records the share holds (without parsing any)."""
        return len(self._records) if self._records is not None else len(self._rows.held)

    @property
    def records(self) -> list[Record]:
        """Every record the share holds, in order. A share read by ``read_share`` parses all of them
        again for each call and they are then all in memory at once: go through the shards
        (``shard_records``) instead wherever that will do."""
        if self._records is not None:
            return self._records
        return self._rows.read(self._rows.held, self.start)

    @property
    def overhang(self) -> list[Record]:
        """The records of later processes that its last shard needs (fewer than ``shard_size``)."""
        if self._rows is None:
            return self._overhang
        return self._rows.read(self._rows.after, self.start + self.held)

    def owned(self, shard: int) -> bool:
        """Shard k (records k*S .. k*S+S-1) belongs to the process that holds its first record."""
        return self.start <= shard * self.shard_size < self.start + self.held

    def shard_records(self, shard: int) -> list[Record]:
        """The records of shard ``shard`` that the share holds or has in its overhang, in order."""
        lo = shard * self.shard_size - self.start
        hi = min(shard * self.shard_size + self.shard_size, self.total) - self.start
        n = self.held
        if self._rows is None:
            return self._records[lo:min(hi, n)] + self._overhang[max(lo - n, 0):max(hi - n, 0)]
        lo = max(lo, 0)
        after = max(lo - n, 0)
        return (self._rows.read(self._rows.held[lo:max(min(hi, n), lo)], self.start + lo)
                + self._rows.read(self._rows.after[after:max(hi - n, after)], self.start + n + after))


LAYOUT_FIELDS = ("prompt", "response", "messages", "chosen", "rejected", "ratings")
MAPPABLE = (*LAYOUT_FIELDS, "subset", "weight", "margin")
# flat attribute columns of the common rating sets (HelpSteer 1/2, UltraFeedback's fine-grained ratings)
KNOWN_RATINGS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "instruction_following",
                 "honesty", "truthfulness", "overall_score")


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """A column mapping ``prompt=question,chosen=response_a`` (or a dict) -> {record field: column}."""
    if not spec:
        return {}
    if isinstance(spec, str):
        pairs = [p.strip() for p in spec.split(",") if p.strip()]
        if not all("=" in p for p in pairs):
            raise ConfigError(f"column mapping {spec!r}: write FIELD=COLUMN pairs separated by commas, e.g. "
                              "prompt=question,chosen=response_a,rejected=response_b")
        spec = dict(p.split("=", 1) for p in pairs)
    out = {str(k).strip(): str(v).strip() for k, v in dict(spec).items()}
    unknown = sorted(set(out) - set(MAPPABLE))
    if unknown:
        raise ConfigError(f"column mapping: {unknown} are not record fields; map any of {list(MAPPABLE)}")
    return out


def remap(record: dict, columns: dict[str, str], ratings: tuple[str, ...], where: str) -> dict:
    """A row with the column mapping and the flat rating columns applied (see the module docstring)."""
    if columns:
        missing = sorted({c for c in columns.values() if c not in record})
        if missing:
            raise ConfigError(f"{where}: the column mapping names column(s) {missing}, which this input does not "
                              f"have (its columns: {sorted(record)}); fix the mapping")
        kept = {k: v for k, v in record.items() if k not in LAYOUT_FIELDS and k not in columns}
        record = {**kept, **{field: record[column] for field, column in columns.items()}}
    if ratings:
        missing = [c for c in ratings if c not in record]
        if missing:
            raise ConfigError(f"{where}: rating column(s) {missing} are not in this input (its columns: "
                              f"{sorted(record)}); fix --ratings")
        record = {**{k: v for k, v in record.items() if k not in ratings}, "ratings": {c: record[c] for c in ratings}}
    elif not _present(record, "ratings") and _present(record, "response"):
        flat = [k for k in KNOWN_RATINGS if isinstance(record.get(k), (int, float)) and not isinstance(record[k], bool)]
        if flat:
            raise DataError(f"{where}: columns {flat} hold ratings of the response; read them as its ratings with "
                            f"--ratings {','.join(flat)} (data.ratings in a train config), or drop them")
    return record


def _parse_row(where: str, default_id: str, row: Any, id_field: str, columns: dict[str, str],
               ratings: tuple[str, ...]) -> tuple[str | None, Any]:
    """(id or None, (prompt, responses, kind, extras) or the row's DataError) of one input row."""
    try:
        if isinstance(row, DataError):
            raise row
        record_id = _record_id(row, id_field, default_id, where)
    except DataError as e:
        return None, e
    try:
        row = remap(row, columns, ratings, where)
        prompt, responses, kind, correct = parse_record(row, where)
        extras = {**_extras(row, kind, where), **({"correct": correct} if correct != 1 else {})}
        return record_id, (prompt, responses, kind, extras)
    except DataError as e:
        return record_id, e


def _id_hash(record_id: str) -> int:
    """A 64-bit hash of an id, the same on every process (Python's ``hash`` of a string is not)."""
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


OK, BAD, NO_ID = 0, 1, 2  # a scanned row parsed; is an error (its id was read); is an error before its id


@dataclasses.dataclass
class _Scan:
    """What the reading pass keeps of each row of a process's part, in input order: a few bytes a row,
    the error of each bad row, and (``parsed``: reading into memory) the rows that parsed."""

    unit: np.ndarray  # int64: the row's unit (``formats.row_count``)
    hash: np.ndarray  # uint64: ``_id_hash`` of its id (0 without one)
    state: np.ndarray  # uint8: OK / BAD / NO_ID
    objectives: np.ndarray  # int32: the objective names of its ratings (an index into ``sets``); -1 unrated
    subset: np.ndarray  # bool: it has a subset
    sets: list[tuple[str, ...]]  # the objective names of the ratings, each set of them as first seen
    errors: dict[int, str]  # row -> its error
    parsed: dict[int, tuple] | None  # row -> (place, id, parsed body) of the rows that parsed


def _scan(path, split, part, limit: int | None, options: tuple, keep: bool) -> _Scan:
    """Parse every row of ``part`` once and keep what ``read_share`` checks of each (``_Scan``)."""
    units, hashes, objectives = array.array("q"), array.array("Q"), array.array("i")
    state, subset = bytearray(), bytearray()
    sets: dict[tuple[str, ...], int] = {}
    errors: dict[int, str] = {}
    parsed: dict[int, tuple] | None = {} if keep else None
    seen: set[str] = set()  # only with a limit, which counts distinct ids
    for j, (unit, where, default_id, row) in enumerate(indexed_rows(path, split, part)):
        if limit is not None and len(seen) >= limit:
            break
        rid, body = _parse_row(where, default_id, row, *options)
        units.append(unit)
        hashes.append(0 if rid is None else _id_hash(rid))
        if isinstance(body, DataError):
            state.append(NO_ID if rid is None else BAD)
            objectives.append(-1)
            subset.append(0)
            errors[j] = str(body)
            continue
        extras = body[3]
        state.append(OK)
        rated = extras.get("ratings")
        objectives.append(-1 if rated is None else sets.setdefault(tuple(name for name, _ in rated), len(sets)))
        subset.append(1 if extras.get("subset") else 0)
        if parsed is not None:
            parsed[j] = (where, rid, body)
        if limit is not None:
            seen.add(rid)
    return _Scan(np.frombuffer(units, np.int64) if units else np.zeros(0, np.int64),
                 np.frombuffer(hashes, np.uint64) if hashes else np.zeros(0, np.uint64),
                 np.frombuffer(state, np.uint8).copy(), np.frombuffer(objectives, np.int32).copy() if objectives
                 else np.zeros(0, np.int32), np.frombuffer(subset, np.uint8).astype(bool), list(sets), errors, parsed)


def _place(scan: _Scan, cursor: RowCursor, j: int) -> str:
    """The place of row ``j`` of the scan (read again from the input unless the scan kept it)."""
    if scan.parsed is not None and j in scan.parsed:
        return scan.parsed[j][0]
    return cursor.row(int(scan.unit[j]))[1]


def _among(values: np.ndarray, sorted_values: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """values[i] in sorted_values, for each i (a chunk at a time: small temporaries)."""
    out = np.zeros(len(values), bool)
    for lo in range(0, len(values), chunk):
        part = values[lo:lo + chunk]
        at = np.minimum(np.searchsorted(sorted_values, part), len(sorted_values) - 1)
        out[lo:lo + chunk] = sorted_values[at] == part
    return out


def _mark_duplicates(scan: _Scan, every: list, me: int, cursor: RowCursor, exchange: Exchange,
                     id_field: str) -> None:
    """Make every row of this process that repeats the id of an earlier row (of any process) that
    parsed an error naming that row. ``every``: (id hashes, has an id) of every process's rows. Rows
    whose hash no other row has are unique; the ids of the (few) rows whose hash another row shares
    are read again from the input and compared, so a hash collision makes no duplicate."""
    hashes = np.concatenate([h[has_id] for h, has_id in every])
    hashes.sort()  # in place: no more than this one copy of the hashes
    shared = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if not shared.size:  # the same on every process: all or none take part in the exchange
        return
    mine = np.flatnonzero((scan.state != NO_ID) & _among(scan.hash, shared))

    def ids():  # (row, id, place, parsed) of each row whose hash another row shares, in input order
        out = []
        for j in mine.tolist():
            if scan.parsed is not None and j in scan.parsed:
                where, rid = scan.parsed[j][:2]
            else:
                _, where, default_id, row = cursor.row(int(scan.unit[j]))
                rid = _record_id(row, id_field, default_id, where)
            out.append((j, rid, where, bool(scan.state[j] == OK)))
        return out

    theirs = exchange("naming duplicate ids", ids)
    first: dict[str, tuple[int, int, str]] = {}  # id -> (process, row, place) of the first row with it that parsed
    for p, rows in enumerate(theirs):
        for j, rid, where, ok in rows:
            if ok and rid not in first:
                first[rid] = (p, j, where)
    for j, rid, where, _ in theirs[me]:
        owner = first.get(rid)
        if owner is not None and owner[:2] < (me, j):
            scan.state[j] = BAD
            scan.errors[j] = (f"{where}: duplicate id {rid!r} (first at {owner[2]}); ids in field {id_field!r} "
                              "must be unique, so fix one of them")
            if scan.parsed is not None:
                scan.parsed.pop(j, None)


def _first_problem(exchange: Exchange, what: str, problems: list[str]) -> None:
    """Raise the input's first problem (the lowest process's first) on every process, if any."""
    firsts = exchange(what, lambda: problems[0] if problems else None)
    first = next((p for p in firsts if p is not None), None)
    if first is not None:
        raise DataError(first)


def _consistency_problems(scan: _Scan, rows: np.ndarray, cursor: RowCursor, exchange: Exchange) -> dict[int, str]:
    """Checks across the records (of every process; ``rows``: this process's rows that passed the
    others): one set of objectives, and a subset on every record or none. {position in rows: problem}."""
    codes, subset = scan.objectives[rows], scan.subset[rows]

    def summary():
        rated = int(np.argmax(codes >= 0)) if codes.size else 0
        named = int(np.argmax(subset)) if subset.size else 0
        return ((scan.sets[codes[rated]], _place(scan, cursor, int(rows[rated])))
                if codes.size and codes[rated] >= 0 else None,
                int(subset.sum()), _place(scan, cursor, int(rows[named])) if subset.size and subset[named] else "",
                len(rows))

    summaries = exchange("checking the records against each other", summary)
    rated = next((s[0] for s in summaries if s[0] is not None), None)
    n_subset, n_all = sum(s[1] for s in summaries), sum(s[3] for s in summaries)
    first_subset = next((s[2] for s in summaries if s[1]), "")
    differ = [c for c, names in enumerate(scan.sets) if rated and set(names) != set(rated[0])]
    found = [np.flatnonzero(np.isin(codes, differ))] if differ else []
    if n_subset and n_subset < n_all:
        found.append(np.flatnonzero(~subset))
    problems: dict[int, str] = {}
    for i in np.unique(np.concatenate(found)).tolist() if found else ():  # in input order: read forward once
        where = _place(scan, cursor, int(rows[i]))
        if codes[i] in differ:
            names, first_place = rated
            other = scan.sets[codes[i]]
            missing, extra = sorted(set(names) - set(other)), sorted(set(other) - set(names))
            problems[i] = (f"{where}: field 'ratings' names other objectives than the first rated record "
                           f"({first_place}): missing {missing}, extra {extra}; give every record the same "
                           "objectives (null where a response is not rated)")
        else:
            problems[i] = (f"{where}: field 'subset' is missing, but {n_subset} other records (first: "
                           f"{first_subset}) have one; give every record a subset, or none")
    return problems


def _sample(total: int, n: int, seed: int) -> np.ndarray | None:
    """The sorted positions of a seeded sample of ``n`` of ``total`` records; None: all of them."""
    if not n or n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def sample_positions(total: int, n: int, seed: int = 0) -> list[int]:
    """The positions ``sample_records`` keeps of ``total`` records, in order."""
    keep = _sample(total, n, seed)
    return list(range(total)) if keep is None else keep.tolist()


class _Rows:
    """The input rows of a read share's records (``held``: by global index from ``Share.start``;
    ``after``: its overhang's), parsed again when asked for, through one forward cursor over the input."""

    def __init__(self, cursor: RowCursor, held: np.ndarray, after: np.ndarray, options: tuple):
        self.cursor, self.held, self.after, self.options = cursor, held, after, options
        self.lock = threading.Lock()  # a prefetching thread and the caller may both ask

    def read(self, units: np.ndarray, first: int) -> list[Record]:
        """The records of ``units`` (input rows), with global indices first, first + 1, ..."""
        with self.lock:
            return [self._record(unit, first + i) for i, unit in enumerate(units.tolist())]

    def _record(self, unit: int, index: int) -> Record:
        _, where, default_id, row = self.cursor.row(unit)
        rid, body = _parse_row(where, default_id, row, *self.options)
        if isinstance(body, DataError):
            raise DataError(f"{body} (this row parsed when the input was first read: the input changed "
                            "while it was read)")
        prompt, responses, kind, extras = body
        return Record(rid, prompt, responses, kind, index, place=where, **extras)


def read_share(path: str | Path, *, process: tuple[int, int] = (0, 1), exchange: Exchange = _alone,
               shard_size: int = 0, on_error: str = "fail", report: RecordReport | None = None,
               limit: int | None = None, id_field: str = "id", split: str | None = None,
               sample: int = 0, seed: int = 0, columns: str | dict | None = None,
               ratings: tuple[str, ...] = ()) -> Share:
    """Process ``process[0]`` of ``process[1]``'s share of ``path``: it parses only its contiguous
    range of the input's rows (``formats.row_count``), and a few small exchanges (``exchange``: run a
    function on every process, gather the results) make the result the same as one process reading
    everything: the same records in the same order with the same global indices, the same first
    error (``on_error="fail"``) or the same skipped rows, ids unique across processes, one set of
    objectives, ``sample`` records drawn the same way. ``columns`` / ``ratings``: a column mapping
    and flat rating columns (the module docstring). With ``shard_size`` S, the process owns the
    shards whose first record it holds (``Share.owned``) and is handed the rows of the records of
    later processes its last shard needs (``Share.shard_records``).

    Its memory does not grow with its records: reading keeps a few bytes a row (what the exchanges
    carry too) and the error of each bad row; the share keeps the input row of each record and
    parses the rows of a shard again when it is asked for (``Share``).
    """
    return _read(path, False, process, exchange, shard_size, on_error, report, limit, id_field, split, sample,
                 seed, columns, ratings)


def _read(path, keep: bool, process: tuple[int, int], exchange: Exchange, shard_size: int, on_error: str,
          report: RecordReport | None, limit: int | None, id_field: str, split: str | None, sample: int,
          seed: int, columns: str | dict | None, ratings: tuple[str, ...]) -> Share:
    """``read_share``; ``keep``: the share holds its records (parsed once, all in memory)."""
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    me, n = process
    options = (id_field, parse_columns(columns), tuple(ratings))
    if limit is not None and n > 1:
        raise ConfigError("limit reads the first records of one process; drop it when reading in parts")
    report = report if report is not None else RecordReport()
    counts = exchange(f"counting the rows of {path}", lambda: row_count(path, split)) if n > 1 else [None]
    if len(set(counts)) > 1:
        raise DataError(f"{path}: the input differs between processes ("
                        + ", ".join(f"{c} rows on process {i}" for i, c in enumerate(counts))
                        + "); give every host the same file")
    part = (counts[0] * me // n, counts[0] * (me + 1) // n) if n > 1 else None
    local: dict[str, Any] = {}

    def scan():  # what travels is a few bytes a row; the rows stay with the process that parsed them
        local["scan"] = s = _scan(path, split, part, limit, options, keep)
        return s.hash, s.state != NO_ID

    # ids: the first record with an id that parses owns it; every later row with that id is a duplicate
    every = exchange(f"reading {path}", scan)
    scan_ = local.pop("scan")
    cursor = RowCursor(path, split)
    _mark_duplicates(scan_, every, me, cursor, exchange, id_field)
    del every
    problems = [scan_.errors[j] for j in sorted(scan_.errors)]
    if on_error == "fail":
        _first_problem(exchange, f"reading {path}", problems)
    rows = np.flatnonzero(scan_.state == OK)  # the rows of the records, until the checks across them
    bad = _consistency_problems(scan_, rows, cursor, exchange)
    if on_error == "fail":
        _first_problem(exchange, f"reading {path}", [bad[i] for i in sorted(bad)])
    if bad:
        rows = np.delete(rows, sorted(bad))
    every = exchange("counting the records", lambda: (len(rows), problems, [bad[i] for i in sorted(bad)]))
    report.read += sum(e[0] for e in every)
    report.skipped.extend([p for e in every for p in e[1]] + [p for e in every for p in e[2]])
    total, offset = sum(e[0] for e in every), sum(e[0] for e in every[:me])
    keep_positions = _sample(total, sample, seed)  # global positions of the records kept; None: all
    if keep_positions is None:
        start, size = offset, total
    else:
        start = int(np.searchsorted(keep_positions, offset))
        stop = int(np.searchsorted(keep_positions, offset + len(rows)))
        rows, size = rows[keep_positions[start:stop] - offset], len(keep_positions)
    held = scan_.unit[rows]
    after = np.zeros(0, np.int64)
    if shard_size and n > 1:  # the rows of the rest of its last shard, from the processes after it
        first_boundary = -(-start // shard_size) * shard_size
        heads = exchange("handing shards over", lambda: (start, held[:max(first_boundary - start, 0)]))
        end = start + len(held)
        if len(held):
            last = ((end - 1) // shard_size + 1) * shard_size
            after = np.concatenate([their[max(end - at, 0):max(last - at, 0)] for at, their in heads[me + 1:]]
                                   or [after])
    units = part if part is not None else (0, len(scan_.unit))
    cursor.close()  # the first shard asked for opens the input again, where that shard starts
    if not keep:
        return Share(None, size, start, units, shard_size, rows=_Rows(cursor, held, after, options))
    records = [Record(rid, prompt, responses, kind, start + i, place=where, **extras)
               for i, (where, rid, (prompt, responses, kind, extras))
               in enumerate(scan_.parsed[j] for j in rows.tolist())]
    overhang = _Rows(cursor, held, after, options).read(after, start + len(held))
    cursor.close()
    return Share(records, size, start, units, shard_size, overhang)


def read_records(path: str | Path, *, on_error: str = "fail", report: RecordReport | None = None,
                 limit: int | None = None, id_field: str = "id", split: str | None = None,
                 columns: str | dict | None = None, ratings: tuple[str, ...] = ()) -> list[Record]:
    """The records of ``path`` in input order (see the module docstring for inputs and layouts).

    ``on_error="fail"`` raises the first bad record's DataError; ``"skip"`` leaves it out and adds the
    error to ``report.skipped``. ``limit`` stops after that many records were read. Errors about the
    input as a whole (missing file, unreadable Parquet, a DatasetDict without ``split``) always raise.
    Several processes each reading their part: ``read_share``.
    """
    return _read(path, True, (0, 1), _alone, 0, on_error, report, limit, id_field, split, 0, 0, columns,
                 ratings).records


def rating_matrix(records: list[Record], objectives: tuple[str, ...] = ()) -> tuple[tuple[str, ...], list]:
    """(objective names, per record a list of K values with None where not rated).

    ``objectives`` fixes the names and their order (a record naming another one is an error); empty
    takes the first rated record's names. A record without ratings is an error naming its place.
    """
    names = tuple(objectives)
    if not names:
        first = next((r for r in records if r.ratings is not None), None)
        if first is None:
            raise DataError("no record has a 'ratings' field; a multi-objective regression needs records "
                            '{"prompt", "response", "ratings": {objective: number or null}}')
        names = tuple(n for n, _ in first.ratings)
    out = []
    for r in records:
        if r.ratings is None:
            raise DataError(f"{r.place}: the record has no 'ratings' field; give {{objective: number or null}} "
                            f"for {list(names)}, or train another head on it")
        values = dict(r.ratings)
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise DataError(f"{r.place}: field 'ratings' names unknown objectives {unknown}; the objectives are "
                            f"{list(names)} (head.objectives); add them there or fix the name")
        out.append([values.get(n) for n in names])
    return names, out


def sample_records(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """A fixed, seeded sample of ``n`` records in input order, re-indexed 0..n-1 (all for n = 0 or n >= len)."""
    if not n or n >= len(records):
        return records
    return [dataclasses.replace(records[i], index=j) for j, i in enumerate(sample_positions(len(records), n, seed))]
