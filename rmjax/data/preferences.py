"""Preference pairs: the bundled real data (HH-RLHF, LLMBar) and the one record type they become.

A ``PreferencePair`` holds the shared prompt as chat messages plus the two final replies, so the
chat template of each model renders it and the shared prefix is explicit (it is computed once).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
from importlib import resources
from pathlib import Path
from typing import Iterator

from rmjax.errors import DataError

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
# Data sources for the ablations: helpful vs harmless is a real data-source contrast.
HH_SOURCES = {
    "helpful": ("helpful-base", "helpful-online", "helpful-rejection-sampled"),
    "harmless": ("harmless-base",),
    "both": HH_SUBSETS,
}
LLMBAR_SUBSETS = ("Natural", "Adversarial_Neighbor", "Adversarial_GPTInst", "Adversarial_GPTOut",
                  "Adversarial_Manual")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: tuple[tuple[str, str], ...]  # ((role, content), ...) ending with a user turn
    chosen: str
    rejected: str
    subset: str = ""

    def messages(self, response: str) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt] + [{"role": "assistant", "content": response}]

    @property
    def prompt_messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]


@dataclasses.dataclass
class LoadReport:
    """What was read, and what was skipped with the reason and place of each."""

    read: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.read} pairs read"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (first: {self.skipped[0]})"
        return s


def bundled_path(*parts: str) -> Path:
    return Path(str(resources.files("rmjax.data").joinpath("bundled", *parts)))


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str, where: str = "") -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [("user", "a"), ("assistant", "b"), ...]."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH-RLHF transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def hh_pair(record: dict, pair_id: str, subset: str, where: str) -> PreferencePair:
    for field in ("chosen", "rejected"):
        if not isinstance(record.get(field), str):
            raise DataError(f"{where}: field {field!r} is missing or not a string")
    chosen = parse_hh_transcript(record["chosen"], f"{where} field 'chosen'")
    rejected = parse_hh_transcript(record["rejected"], f"{where} field 'rejected'")
    if chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant":
        raise DataError(f"{where}: a transcript does not end with an Assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: chosen and rejected differ before the last reply, so they do not share a prompt")
    return PreferencePair(pair_id, tuple(chosen[:-1]), chosen[-1][1], rejected[-1][1], subset)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, record or the error for that line); gzip by suffix; non-UTF-8 is an error."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                yield lineno, DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            yield lineno, record


def load_hh_rlhf(subsets: tuple[str, ...] | str = HH_SUBSETS, *, root: Path | None = None,
                 on_error: str = "skip", report: LoadReport | None = None) -> list[PreferencePair]:
    """Bundled HH-RLHF test pairs. ``subsets``: names or a source in HH_SOURCES ('helpful', ...)."""
    if isinstance(subsets, str):
        subsets = HH_SOURCES.get(subsets, (subsets,))
    unknown = [s for s in subsets if s not in HH_SUBSETS]
    if unknown:
        raise DataError(f"unknown HH-RLHF subsets {unknown}; known: {list(HH_SUBSETS)} or sources {list(HH_SOURCES)}")
    root = root or bundled_path("hh_rlhf")
    report = report if report is not None else LoadReport()
    pairs = []
    for subset in subsets:
        path = root / f"{subset}_test.jsonl.gz"
        for lineno, rec in read_jsonl(path):
            try:
                if isinstance(rec, DataError):
                    raise rec
                pairs.append(hh_pair(rec, f"{subset}:{lineno}", subset, f"{path}:{lineno}"))
                report.read += 1
            except DataError as e:
                if on_error == "fail":
                    raise
                report.skipped.append(str(e))
    return pairs


def load_llmbar(subsets: tuple[str, ...] = LLMBAR_SUBSETS, *, root: Path | None = None) -> list[PreferencePair]:
    """LLMBar pairs (held-out evaluation only): label 1 or 2 names the preferred output."""
    root = root or bundled_path("llmbar")
    pairs = []
    for subset in subsets:
        path = root / f"LLMBar_{subset}.json"
        if not path.exists():
            raise DataError(f"{path}: LLMBar subset {subset!r} not found; known: {list(LLMBAR_SUBSETS)}")
        for i, rec in enumerate(json.loads(path.read_text("utf-8"))):
            where = f"{path} item {i}"
            missing = [k for k in ("input", "output_1", "output_2", "label") if k not in rec]
            if missing:
                raise DataError(f"{where}: missing fields {missing}")
            if rec["label"] not in (1, 2):
                raise DataError(f"{where}: field 'label' must be 1 or 2, got {rec['label']!r}")
            good, bad = (rec["output_1"], rec["output_2"]) if rec["label"] == 1 else (rec["output_2"], rec["output_1"])
            pairs.append(PreferencePair(f"{subset}:{i}", (("user", rec["input"]),), good, bad, subset))
    return pairs


def load_value_prompts(path: Path | None = None) -> dict[str, str]:
    """The 54 value prompts {key: text}; keys starting with worst/bad/terrible are negatively framed."""
    import yaml

    path = path or bundled_path("prompts", "value_prompts.yaml")
    data = yaml.safe_load(Path(path).read_text("utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DataError(f"{path}: expected a mapping of prompt key -> prompt text")
    return data
