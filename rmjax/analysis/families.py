"""Model family = the base model an RM was trained from, inferred from its name or given in a file."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import yaml

from rmjax.analysis.notes import examples, warn
from rmjax.errors import ConfigError, DataError

# Checked against the lowercased model name; more than one match is ambiguous and must be settled by a file.
FAMILY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern)) for family, pattern in (
        ("gemma", r"gemma"),
        ("llama", r"llama"),
        ("qwen", r"qwen"),
        ("mistral", r"mistral|mixtral"),
        ("phi", r"(?:^|[^a-z])phi-?\d"),
        ("deepseek", r"deepseek"),
        ("olmo", r"olmo"),
        ("smollm", r"smollm"),
        ("internlm", r"internlm"),
        ("falcon", r"falcon"),
    ))


def infer_family(model: str) -> str | None:
    """The family named in `model`, or None when no known family is named."""
    name = model.lower()
    found = [family for family, pattern in FAMILY_PATTERNS if pattern.search(name)]
    if len(found) > 1:
        raise DataError(f"model {model!r} names several families ({', '.join(found)}); say which one it was "
                        "trained from in a --families file (columns model,family)")
    return found[0] if found else None


def load_family_file(path: str | Path) -> dict[str, str]:
    """model -> family from a CSV (columns `model`, `family`) or a YAML/JSON mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--families file {path} does not exist; give a CSV with columns model,family")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(path.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping `model: family`, got {type(data).__name__}")
        pairs = [(str(k), v, f"key {k!r}") for k, v in data.items()]
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        columns = {c.strip().lower(): c for c in table.columns}
        if "model" not in columns or "family" not in columns:
            raise ConfigError(f"{path}: needs columns `model` and `family`, found {list(table.columns)}")
        pairs = [(row[columns["model"]], row[columns["family"]], f"line {i + 2}") for i, row in table.iterrows()]
    families: dict[str, str] = {}
    for model, family, where in pairs:
        model, family = str(model).strip(), str(family if family is not None else "").strip().lower()
        if not model or not family:
            raise ConfigError(f"{path}, {where}: empty model or family; give both, e.g. `my-rm,llama`")
        # a model id with `/` names the same model as its file name with `_`
        key = model.replace("/", "_")
        if key in families and families[key] != family:
            raise ConfigError(f"{path}, {where}: model {model!r} is given two families ({families[key]}, {family})")
        families[key] = family
    return families


def assign_families(models: Iterable[str], given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Family of each model: `given` first, then the name; every model must end up with one."""
    given = dict(given or {})
    models = list(models)
    unused = sorted(set(given) - set(models))
    if unused:
        warn(f"--families names {len(unused)} models without a score file, ignored: {examples(unused)}")
    assigned, unknown = {}, []
    for model in models:
        family = given.get(model) or infer_family(model)
        if family is None:
            unknown.append(model)
        else:
            assigned[model] = family
    if unknown:
        known = ", ".join(f for f, _ in FAMILY_PATTERNS)
        raise DataError(f"cannot tell the model family of {len(unknown)} model(s): {examples(unknown, 10)}. Their "
                        f"names mention none of {known}; give a --families CSV with columns model,family")
    return assigned
