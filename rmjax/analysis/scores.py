"""Reading RM score tables: one file per model, a `response` column and one numeric column per prompt.

The model name is the file name without extension (a model id with `/` replaced by `_`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rmjax.analysis.dictionary import normalise_word
from rmjax.analysis.notes import examples, warn
from rmjax.errors import DataError

RESPONSE_COLUMN = "response"
SCORE_SUFFIXES = (".csv", ".parquet")
NEGATIVE_PREFIXES = ("worst", "bad", "terrible")


@dataclass
class ScoreSet:
    tables: dict[str, pd.DataFrame]  # model -> scores, index = normalised word, columns = prompts
    sources: dict[str, Path]
    prompts: list[str]

    @property
    def models(self) -> list[str]:
        return list(self.tables)


def prompt_framing(prompt: str) -> str:
    """Prompts asking for the worst / a bad / a terrible thing are negatively framed; all others positive."""
    return "negative" if prompt.lower().startswith(NEGATIVE_PREFIXES) else "positive"


def load_scores(directory: str | Path, common_prompts: bool = False) -> ScoreSet:
    """Every `*.csv` / `*.parquet` score file of `directory`, validated; see `read_score_file`.

    Prompt columns must be the same in every file; with `common_prompts` the prompts all files share are
    used instead and the dropped ones are reported.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"score directory {directory} does not exist; give the folder holding one score file per model")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in SCORE_SUFFIXES)
    if not files:
        raise DataError(f"{directory} holds no .csv or .parquet score file; each model needs a file with a "
                        f"{RESPONSE_COLUMN!r} column and one column per prompt")
    tables = {}
    sources = {}
    for path in files:
        model = path.stem
        if model in tables:
            raise DataError(f"{path} and {sources[model]} both name model {model!r}; keep one of them")
        tables[model], sources[model] = read_score_file(path), path
    prompts = _agreed_prompts(tables, sources, common_prompts)
    return ScoreSet({m: t[prompts] for m, t in tables.items()}, sources, prompts)


def read_score_file(path: Path) -> pd.DataFrame:
    """Scores of one model: index = normalised response, one float column per prompt.

    Non-numeric, empty or infinite scores are errors naming the line and column. Responses that are only
    whitespace (vocabulary tokens such as "\\n") cannot be dictionary words and are skipped with a
    warning. Responses repeated after strip + lowercase (" Love", "love") are merged, each prompt keeping
    the highest score among the variants (in a next-token table: the most probable variant), with a
    warning that counts them.
    """
    raw = _read_raw(path)
    columns = [str(c) for c in raw.columns]
    raw.columns = columns
    if RESPONSE_COLUMN not in columns:
        raise DataError(f"{path}: no {RESPONSE_COLUMN!r} column (columns: {examples(columns, 8)}); name the column "
                        f"holding the scored words {RESPONSE_COLUMN!r}")
    prompts = [c for c in columns if c != RESPONSE_COLUMN]
    unnamed = [c for c in prompts if c.startswith("Unnamed:") or not c.strip()]
    if unnamed:
        raise DataError(f"{path}: unnamed column(s) {unnamed} (often a saved index); delete them or name each "
                        "prompt column")
    if not prompts:
        raise DataError(f"{path}: no prompt columns beside {RESPONSE_COLUMN!r}; add one score column per prompt")
    if len(raw) == 0:
        raise DataError(f"{path}: no rows; each scored response needs a row")
    text = raw[RESPONSE_COLUMN].map(lambda v: "" if pd.isna(v) else str(v))
    empty = np.flatnonzero((text == "").to_numpy())
    if len(empty):
        raise DataError(f"{path}, {_row_name(path, empty[0])}, column {RESPONSE_COLUMN!r}: empty response "
                        f"({len(empty)} such rows); fill in the word or delete the row")
    words = text.map(normalise_word)
    blank = (words == "").to_numpy()
    if blank.any():
        warn(f"{path}: {int(blank.sum())} responses are only whitespace (e.g. {text[blank].iloc[0]!r}) and were "
             "skipped: no dictionary word can match them")
        raw, words = raw[~blank], words[~blank]
    scores = pd.DataFrame({p: _numeric_column(raw[p], path, p) for p in prompts})
    scores.index = pd.Index(words.to_numpy(), name="word")
    duplicated = scores.index.duplicated(keep="first")
    if duplicated.any():
        positions = np.flatnonzero(~blank)[duplicated] if blank.any() else np.flatnonzero(duplicated)
        repeats = [f"{w!r} ({_row_name(path, i)})" for i, w in zip(positions, scores.index[duplicated])]
        warn(f"{path}: {int(duplicated.sum())} responses repeat an earlier one after strip + lowercase; each prompt "
             f"keeps the highest score among the variants: {', '.join(repeats[:5])}"
             + (f", ... (+{len(repeats) - 5} more)" if len(repeats) > 5 else ""))
        scores = scores.groupby(level=0, sort=False).max()
    return scores


def _read_raw(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as a score table ({e}); save it as UTF-8 CSV or Parquet") from e


def _row_name(path: Path, index: int) -> str:
    # CSV: line 1 is the header; Parquet has no lines, so count data rows from 1
    return f"row {index + 1}" if path.suffix.lower() == ".parquet" else f"line {index + 2}"


def _numeric_column(column: pd.Series, path: Path, prompt: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(dtype=float)  # Parquet: already numbers
        if np.isfinite(values).all():
            return values
    text = column.map(lambda v: "" if pd.isna(v) else str(v).strip())
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        first = bad[0]
        problem = "is empty" if text.iloc[first] == "" else f"{text.iloc[first]!r} is not a finite number"
        raise DataError(f"{path}, {_row_name(path, int(column.index[first]))}, column {prompt!r}: the score {problem} "
                        f"({len(bad)} such cells in this column); every prompt column needs a numeric score per row")
    return values


def _agreed_prompts(tables: dict[str, pd.DataFrame], sources: dict[str, Path], common_prompts: bool) -> list[str]:
    first = next(iter(tables.values()))
    union = list(dict.fromkeys(p for t in tables.values() for p in t.columns))
    lacking = {m: [p for p in union if p not in t.columns] for m, t in tables.items()}
    lacking = {m: missing for m, missing in lacking.items() if missing}
    if not lacking:
        return list(first.columns)
    shared = [p for p in union if all(p in t.columns for t in tables.values())]
    details = "; ".join(f"{sources[m].name} lacks {len(v)}: {examples(v)}" for m, v in lacking.items())
    if not common_prompts:
        raise DataError(f"prompt columns differ between score files ({details}). Give every file the same prompt "
                        f"columns, or pass --common-prompts to use only the {len(shared)} prompts all files share")
    if not shared:
        raise DataError(f"the score files share no prompt column ({details}); score every model on the same prompts")
    warn(f"--common-prompts: using the {len(shared)} prompts all files share; {len(union) - len(shared)} of "
         f"{len(union)} prompt columns are not used ({details})")
    return shared
