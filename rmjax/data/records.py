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

import bisect
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from rmjax.data.formats import input_fingerprint, row_count, rows
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


@dataclasses.dataclass
class Share:
    """One process's share of an input (``read_share``): its records, with their global indices
    (contiguous), the size of the whole, and the records of later processes its shards need."""

    records: list[Record]
    total: int  # records of the whole input (after skipping and sampling)
    start: int  # global index of records[0] (where records would start when empty)
    units: tuple[int, int]  # the rows / lines lo..hi-1 it parsed (``formats.row_count``; one process: rows read)
    shard_size: int = 0
    overhang: list[Record] = dataclasses.field(default_factory=list)  # the rest of its last shard

    def owned(self, shard: int) -> bool:
        """Shard k (records k*S .. k*S+S-1) belongs to the process that holds its first record."""
        return self.start <= shard * self.shard_size < self.start + len(self.records)

    def shard_records(self, shard: int) -> list[Record]:
        lo = shard * self.shard_size - self.start
        hi = min(shard * self.shard_size + self.shard_size, self.total) - self.start
        n = len(self.records)
        return self.records[lo:min(hi, n)] + self.overhang[max(lo - n, 0):max(hi - n, 0)]


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


def _parse_rows(path, split, part, id_field: str, limit: int | None, columns: dict | None = None,
                ratings: tuple[str, ...] = ()) -> list[tuple[str, str | None, Any]]:
    """(place, id or None, (prompt, responses, kind, extras) or the row's DataError) per row of ``part``."""
    out, seen, valid = [], set(), 0
    for where, default_id, rec in rows(path, split, part):
        if limit is not None and valid >= limit:
            break
        try:
            if isinstance(rec, DataError):
                raise rec
            record_id = _record_id(rec, id_field, default_id, where)
        except DataError as e:
            out.append((where, None, e))
            continue
        try:
            rec = remap(rec, columns or {}, tuple(ratings), where)
            prompt, responses, kind, correct = parse_record(rec, where)
            extras = {**_extras(rec, kind, where), **({"correct": correct} if correct != 1 else {})}
            out.append((where, record_id, (prompt, responses, kind, extras)))
            valid += record_id not in seen
            seen.add(record_id)
        except DataError as e:
            out.append((where, record_id, e))
    return out


def _first_problem(exchange: Exchange, what: str, problems: list[str]) -> None:
    """Raise the input's first problem (the lowest process's first) on every process, if any."""
    firsts = exchange(what, lambda: problems[0] if problems else None)
    first = next((p for p in firsts if p is not None), None)
    if first is not None:
        raise DataError(first)


def _consistency_problems(records: list[Record], exchange: Exchange) -> dict[int, str]:
    """Checks across records (of every process): one set of objectives, and a subset on every record or none."""
    def summary():
        rated = next((r for r in records if r.ratings is not None), None)
        with_subset = [r for r in records if r.subset]
        return ((tuple(n for n, _ in rated.ratings), rated.place) if rated else None,
                len(with_subset), with_subset[0].place if with_subset else "", len(records))
    summaries = exchange("checking the records against each other", summary)
    rated = next((s[0] for s in summaries if s[0] is not None), None)
    n_subset, n_all = sum(s[1] for s in summaries), sum(s[3] for s in summaries)
    first_subset = next((s[2] for s in summaries if s[1]), "")
    problems: dict[int, str] = {}
    if rated:
        names, first_place = rated
        for r in records:
            if r.ratings is None or r.place == first_place:
                continue
            other = [n for n, _ in r.ratings]
            if set(other) != set(names):
                missing, extra = sorted(set(names) - set(other)), sorted(set(other) - set(names))
                problems[r.index] = (f"{r.place}: field 'ratings' names other objectives than the first rated "
                                     f"record ({first_place}): missing {missing}, extra {extra}; give every "
                                     "record the same objectives (null where a response is not rated)")
    if n_subset and n_subset < n_all:
        for r in records:
            if not r.subset:
                problems.setdefault(r.index, f"{r.place}: field 'subset' is missing, but {n_subset} "
                                             f"other records (first: {first_subset}) have one; give every "
                                             "record a subset, or none")
    return problems


def sample_positions(total: int, n: int, seed: int = 0) -> list[int]:
    """The positions ``sample_records`` keeps of ``total`` records, in order."""
    import numpy as np

    if not n or n >= total:
        return list(range(total))
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False)).tolist()


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
    shards whose first record it holds (``Share.owned``) and receives the records of later processes
    its last shard needs (``Share.shard_records``).
    """
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    me, n = process
    columns = parse_columns(columns)
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

    def parse():  # only the ids travel; the rows stay with the process that parsed them
        local["parsed"] = _parse_rows(path, split, part, id_field, limit, columns, tuple(ratings))
        return [(rid, not isinstance(body, DataError)) for _, rid, body in local["parsed"]]

    # ids: the first record with an id that parses owns it; every later row with that id is a duplicate
    ids = exchange(f"reading {path}", parse)
    parsed = local["parsed"]
    owner: dict[str, tuple[int, int]] = {}
    for p, their in enumerate(ids):
        for j, (rid, ok) in enumerate(their):
            if ok and rid is not None and rid not in owner:
                owner[rid] = (p, j)
    duplicated = {rid for p, their in enumerate(ids) for j, (rid, _) in enumerate(their)
                  if rid in owner and owner[rid] < (p, j)}
    places = {}
    if duplicated:
        mine = {rid: parsed[j][0] for rid, (p, j) in owner.items() if p == me and rid in duplicated}
        for theirs in exchange("naming duplicate ids", lambda: mine):
            places.update(theirs)
    kept: list[tuple[str, str, Any]] = []
    problems: list[str] = []
    for j, (where, rid, body) in enumerate(parsed):
        if rid in duplicated and owner[rid] < (me, j):
            body = DataError(f"{where}: duplicate id {rid!r} (first at {places[rid]}); "
                             f"ids in field {id_field!r} must be unique, so fix one of them")
        if isinstance(body, DataError):
            problems.append(str(body))
        else:
            kept.append((where, rid, body))
    if on_error == "fail":
        _first_problem(exchange, f"reading {path}", problems)
    # indices are local until the records that pass every check are counted on every process
    records = [Record(rid, prompt, responses, kind, j, place=where, **extras)
               for j, (where, rid, (prompt, responses, kind, extras)) in enumerate(kept)]
    bad = _consistency_problems(records, exchange)
    if on_error == "fail":
        _first_problem(exchange, f"reading {path}", [bad[i] for i in sorted(bad)])
    records = [r for r in records if r.index not in bad]
    every = exchange("counting the records", lambda: (len(records), problems, [bad[i] for i in sorted(bad)]))
    report.read += sum(e[0] for e in every)
    report.skipped.extend([p for e in every for p in e[1]] + [p for e in every for p in e[2]])
    total, offset = sum(e[0] for e in every), sum(e[0] for e in every[:me])
    keep = sample_positions(total, sample, seed)  # global positions of the records kept
    start = bisect.bisect_left(keep, offset)
    mine_pos = keep[start:bisect.bisect_left(keep, offset + len(records))]
    records = [dataclasses.replace(records[g - offset], index=start + j) for j, g in enumerate(mine_pos)]
    share = Share(records, len(keep), start, part if part is not None else (0, len(parsed)), shard_size)
    if shard_size and n > 1:
        first_boundary = -(-start // shard_size) * shard_size
        heads = exchange("handing shards over", lambda: [r for r in records if r.index < first_boundary])
        end = start + len(records)
        if records:
            last = (records[-1].index // shard_size + 1) * shard_size
            share.overhang = [r for their in heads[me + 1:] for r in their if end <= r.index < last]
    return share


def read_records(path: str | Path, *, on_error: str = "fail", report: RecordReport | None = None,
                 limit: int | None = None, id_field: str = "id", split: str | None = None,
                 columns: str | dict | None = None, ratings: tuple[str, ...] = ()) -> list[Record]:
    """The records of ``path`` in input order (see the module docstring for inputs and layouts).

    ``on_error="fail"`` raises the first bad record's DataError; ``"skip"`` leaves it out and adds the
    error to ``report.skipped``. ``limit`` stops after that many records were read. Errors about the
    input as a whole (missing file, unreadable Parquet, a DatasetDict without ``split``) always raise.
    Several processes each reading their part: ``read_share``.
    """
    return read_share(path, on_error=on_error, report=report, limit=limit, id_field=id_field,
                      split=split, columns=columns, ratings=ratings).records


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
