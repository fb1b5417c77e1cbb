"""One config system for every job: typed dataclass sections read from YAML and dotted ``key=value``
overrides, checked on load, saved resolved beside each run, and listed by every command's ``--help``.

    config = load(ScoreConfig, "job.yaml", ["model.name=gemma3-270m", "batch.layout=kv"])
    save(config, run_dir / "config.yaml")
    keys(ScoreConfig)                       # [(dotted key, default, help)]: every key, for --help

A field's help text and allowed values live in its metadata (``knob(default, help, choices=...)``),
so each knob is declared once, where its section is. An unknown key is an error that names the file
(or the override) and the closest valid key; a value of the wrong type or outside its choices names
the key and what it accepts. A config class may define ``check(self) -> list[(ok, message)]`` for
rules across fields; every section's checks run on load.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rmjax.errors import ConfigError

T = TypeVar("T")


def knob(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, *,  # noqa: A002
         factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text and (optionally) its allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, **defaults) -> Any:
    """A nested section field whose defaults differ from the section's own (e.g. a job that runs in bf16)."""
    return dataclasses.field(default_factory=lambda: cls(**defaults))


# ---------------------------------------------------------------- reading values

def _strings(text: str) -> Any:
    """YAML with every scalar kept as text: each field's type decides (so 'No' stays a label)."""
    return yaml.load(text, Loader=yaml.BaseLoader)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            out = hint(value)
            if hint is int and isinstance(value, float) and value != out:
                raise ValueError(value)
            return out
        if hint is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str) and typing.get_args(hint)[0] is str and not value.startswith("["):
                return (value,)  # one input, e.g. hh-rlhf:helpful-base,helpful-online
            if isinstance(value, str):
                value = _strings(value if value.startswith("[") else f"[{value}]")
            (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
            return tuple(_coerce(v, item, where) for v in value)
        if origin in (typing.Union, types.UnionType):  # X | None
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if value == "" and args == [str]:  # str | None: '' is a value ("no model"), None the default
                return ""
            if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
                return None
            return _coerce(value, args[0], where)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{where}: unsupported field type {hint}")
    raise ConfigError(f"{where}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _hints(obj_or_cls) -> dict:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return typing.get_type_hints(cls)


def set_key(obj: Any, dotted: str, value: Any, where: str) -> None:
    """Set ``obj``'s dotted key from text / YAML values (unknown keys and bad values are errors)."""
    *parents, leaf = dotted.split(".")
    path = []
    for name in parents + [leaf]:
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            prefix = ".".join(path)
            options = [f"{prefix}.{f}" if prefix else f for f in fields]
            close = difflib.get_close_matches(".".join(path + [name]), options, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {sorted(options)}"
            raise ConfigError(f"{where}: unknown key {'.'.join(path + [name])!r}{hint}")
        path.append(name)
        if name != leaf:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where}: {'.'.join(path)!r} is a value, not a section")
    if dataclasses.is_dataclass(getattr(obj, leaf)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {dotted!r} is a section; give a mapping")
        for k, v in value.items():
            set_key(getattr(obj, leaf), k, v, where)
        return
    object.__setattr__(obj, leaf, _coerce(value, _hints(obj)[leaf], f"{where}: {dotted}"))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_flatten(v, key + ".") if isinstance(v, dict) else [(key, v)])
    return out


# ---------------------------------------------------------------- checking

def _walk(obj: Any, prefix: str = ""):
    """(dotted key, field, value, owner) of every leaf field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".")
        else:
            yield key, f, value, obj


def _sections(obj: Any):
    yield obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value)


def validate(config: T, where: str = "config") -> T:
    """Every field within its choices, every section's ``check()`` rules true; the config itself."""
    for key, f, value, _ in _walk(config):
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {list(choices)}")
    for sec in _sections(config):
        check = getattr(sec, "check", None)
        if check is None:
            continue
        for ok, message in check():
            if not ok:
                raise ConfigError(f"{where}: {message}")
    return config


# ---------------------------------------------------------------- loading and saving

def apply(config: T, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """``config`` with the YAML file's keys and then the ``key=value`` overrides set (not validated)."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = _strings(path.read_text("utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys or sections")
        for key, value in _flatten(data):
            set_key(config, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. optim.lr=3e-5")
        key, value = item.split("=", 1)
        set_key(config, key.strip(), _strings(value) if value else "", f"override {item!r}")
    return config


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """A ``cls`` config: its defaults, then the YAML file, then the overrides; validated."""
    config = apply(cls(), path, overrides)
    return validate(config, str(path) if path else "config")


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def plain(config: Any) -> dict:
    """The config as plain YAML-able types (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(_lists(dataclasses.asdict(config))))


def save(config: Any, path: str | Path) -> None:
    """The resolved config as YAML (``load(cls, path)`` reads it back)."""
    Path(path).write_text(yaml.safe_dump(plain(config), sort_keys=False))


def keys(cls_or_config: Any) -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) of every field, in declaration order."""
    config = cls_or_config() if isinstance(cls_or_config, type) else cls_or_config
    return [(key, value, f.metadata.get("help", "")) for key, f, value, _ in _walk(config)]


def describe(cls_or_config: Any) -> str:
    """Every key with its default and help: the keys section of a command's ``--help``."""
    lines = []
    for key, value, text in keys(cls_or_config):
        shown = list(value) if isinstance(value, tuple) else value
        lines.append(f"  {key} = {shown!r}" + (f"  # {text}" if text else ""))
    return "\n".join(lines)
