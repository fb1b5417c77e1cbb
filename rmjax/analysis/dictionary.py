"""Word dictionaries: which category (or categories) each word belongs to.

Two layouts are read:
- LIWC-like (`.dicx` or `.csv`): a `DicTerm` column and one column per category, "X" marks membership;
- two-column CSV: a `Category` column and a word column.
Words are normalised like responses (strip + lowercase). Categories named `<Foundation>_Virtue` /
`<Foundation>_Vice` (Moral Foundations Dictionary) merge into their foundation unless `keep_valence`; the
columns as the file names them stay available (`columns`, `column_memberships`) for analyses that select
terms by column, such as the authors' ranking of MFD 2.0 (`rmjax.analysis.cells.ranked_words`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from rmjax.analysis.notes import examples, warn
from rmjax.errors import ConfigError, DataError

BUNDLED_DICTIONARIES = {
    "big2_nouns": "big2_nouns.csv",
    "big2_expanded": "big2_expanded.csv",
    "mfd2": "mfd2.dicx",
}
_VALENCE_SUFFIX = re.compile(r"^(?P<base>.+?)[ _.-](?:virtue|vice)$", re.IGNORECASE)
_MEMBER_MARKS = {"x"}
_EMPTY_MARKS = {"", "na", "nan"}


@dataclass(frozen=True)
class Dictionary:
    name: str
    categories: tuple[str, ...]
    memberships: dict[str, frozenset[str]]  # normalised word -> its categories
    # the category columns as the file names them (before Virtue/Vice merge), in file order, and the columns
    # each word is marked in; empty when the dictionary was built in code
    columns: tuple[str, ...] = ()
    column_memberships: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)

    @property
    def words(self) -> list[str]:
        return sorted(self.memberships)

    def words_in(self, category: str) -> list[str]:
        return sorted(w for w, cats in self.memberships.items() if category in cats)

    def pairs(self) -> pd.DataFrame:
        """One row per (word, category) membership; a word in two categories has two rows."""
        rows = [(w, c) for w in sorted(self.memberships) for c in self.categories if c in self.memberships[w]]
        return pd.DataFrame(rows, columns=["word", "category"])


def normalise_word(text: str) -> str:
    return str(text).strip().lower()


def bundled_dictionary_path(name: str) -> Path:
    return Path(str(resources.files("rmjax.analysis") / "dictionaries" / BUNDLED_DICTIONARIES[name]))


def load_dictionary(name_or_path: str | Path, keep_valence: bool = False) -> Dictionary:
    """A bundled dictionary by name (`big2_nouns`, `big2_expanded`, `mfd2`) or a dictionary file."""
    key = str(name_or_path)
    if key in BUNDLED_DICTIONARIES:
        path, name = bundled_dictionary_path(key), key
    else:
        path = Path(key)
        if not path.is_file():
            raise ConfigError(
                f"dictionary {key!r} is neither a bundled name ({', '.join(BUNDLED_DICTIONARIES)}) nor an "
                "existing file; give one of those names or the path of a LIWC-like (.dicx/.csv) or "
                "two-column (Category, word) CSV file")
        name = path.stem
    table = _read_table(path)
    lowered = {c.strip().lower(): c for c in table.columns}
    if "dicterm" in lowered:
        memberships, categories = _parse_liwc(table, path, lowered["dicterm"])
    elif len(table.columns) == 2 and "category" in lowered:
        memberships, categories = _parse_two_column(table, path, lowered["category"])
    else:
        raise DataError(
            f"{path}: cannot tell the dictionary layout from its columns {list(table.columns)}; use either a "
            "`DicTerm` column plus one column per category with 'X' marking membership, or exactly two "
            "columns `Category` and the word")
    columns, column_memberships = tuple(categories), memberships
    if not keep_valence:
        memberships, categories = _merge_valence(memberships, categories)
    if not memberships:
        raise DataError(f"{path}: the dictionary holds no word with a category; add rows with a word and its category")
    return Dictionary(name=name, categories=tuple(categories), memberships=memberships, columns=columns,
                      column_memberships=column_memberships)


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        if len(table.columns) == 1 and "\t" in table.columns[0]:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t", encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot be read as a CSV dictionary ({e}); save it as UTF-8 CSV") from e
    return table


def _parse_liwc(table: pd.DataFrame, path: Path, term_column: str) -> tuple[dict[str, frozenset[str]], list[str]]:
    categories = [c for c in table.columns if c != term_column]
    if not categories:
        raise DataError(f"{path}: the `{term_column}` column has no category columns beside it; add one column "
                        "per category with 'X' marking membership")
    memberships: dict[str, set[str]] = {}
    no_category, wildcards = [], []
    repeated: set[str] = set()
    repeat_rows = 0
    for index, row in table.iterrows():
        line = int(index) + 2  # header is line 1
        word = normalise_word(row[term_column])
        if not word:
            raise DataError(f"{path}, line {line}, column {term_column!r}: empty term; fill it in or delete the row")
        cats = set()
        for category in categories:
            mark = str(row[category]).strip().lower()
            if mark in _MEMBER_MARKS:
                cats.add(category)
            elif mark not in _EMPTY_MARKS:
                raise DataError(f"{path}, line {line}, column {category!r}: value {row[category]!r} for term "
                                f"{word!r}; mark membership with 'X' and leave non-members empty or NA")
        if not cats:
            no_category.append(word)
            continue
        if "*" in word:
            wildcards.append(word)
        if word in memberships:
            repeated.add(word)
            repeat_rows += 1
        memberships.setdefault(word, set()).update(cats)
    if no_category:
        warn(f"{path}: {len(no_category)} dictionary terms have no category marked and are not used: "
             f"{examples(no_category)}")
    if repeated:
        warn(f"{path}: {repeat_rows} rows repeat a term of an earlier row ({len(repeated)} terms, e.g. "
             f"{examples(sorted(repeated), 3)}); the categories of each term were merged")
    if wildcards:
        warn(f"{path}: {len(wildcards)} terms contain '*' and are matched literally, not as prefixes: "
             f"{examples(wildcards)}")
    return {w: frozenset(c) for w, c in memberships.items()}, categories


def _parse_two_column(table: pd.DataFrame, path: Path, category_column: str
                      ) -> tuple[dict[str, frozenset[str]], list[str]]:
    word_column = next(c for c in table.columns if c != category_column)
    memberships: dict[str, set[str]] = {}
    categories: list[str] = []
    repeated = 0
    for index, row in table.iterrows():
        line = int(index) + 2
        word, category = normalise_word(row[word_column]), str(row[category_column]).strip()
        if not word or not category:
            empty = word_column if not word else category_column
            raise DataError(f"{path}, line {line}, column {empty!r}: empty value; fill it in or delete the row")
        if category not in categories:
            categories.append(category)
        if category in memberships.get(word, ()):
            repeated += 1
        memberships.setdefault(word, set()).add(category)
    if repeated:
        warn(f"{path}: {repeated} (word, category) rows are repeats and were merged")
    return {w: frozenset(c) for w, c in memberships.items()}, categories


def _merge_valence(memberships: dict[str, frozenset[str]], categories: list[str]
                   ) -> tuple[dict[str, frozenset[str]], list[str]]:
    """`Care_Virtue` and `Care_Vice` become `Care`; categories without a valence suffix are kept as they are."""
    base_of = {}
    for category in categories:
        match = _VALENCE_SUFFIX.match(category)
        base_of[category] = match.group("base") if match else category
    merged_categories = list(dict.fromkeys(base_of[c] for c in categories))
    merged = {w: frozenset(base_of[c] for c in cats) for w, cats in memberships.items()}
    return merged, merged_categories
