"""Commands map flags onto a job's typed config (``rmjax.config``): nothing else.

    add_config_arguments(parser, ScoreConfig, {"--max-length": "data.max_length", ...})
    config = config_from_args(ScoreConfig, args)      # defaults < --config FILE < flags < KEY=VALUE

Every flag takes its help text, type and choices from the config field it sets, so each knob is
declared once (in its section); ``--config FILE`` reads a YAML file of keys, positional ``KEY=VALUE``
overrides set any key, and ``--help`` lists every key with its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from rmjax import config as rconfig
from rmjax.models.config import Numerics


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag for config key ``key``; ``convert`` turns its value into [(key, value)]
    (several keys, or another shape); ``action`` / ``nargs`` / ``metavar`` / ``help`` as argparse's."""

    key: str
    help: str | None = None
    action: str | None = None
    nargs: Any = None
    metavar: Any = None
    convert: Callable[[Any], list[tuple[str, Any]]] | None = None


# the numerics every model job shares (rmjax.models.config.Numerics), as flags
NUMERICS_FLAGS = {"--" + f.name.replace("_", "-"): f"model.{f.name}" for f in dataclasses.fields(Numerics)}


def comma_list(key: str) -> Callable[[str], list[tuple[str, Any]]]:
    """A flag value "a,b,c" as the tuple ("a", "b", "c") of ``key``."""
    return lambda value: [(key, tuple(x.strip() for x in value.split(",") if x.strip()))]


def no_progress(help: str) -> Flag:
    """``--no-progress``: sets the job's ``progress`` key to false."""
    return Flag("progress", action="store_true", convert=lambda v: [("progress", not v)], help=help)


# the model and corpus flags of a job that runs a model over records (model + a DataSection with
# sample / seed, e.g. rmjax.jobs.features.FeaturesData)
CORPUS_FLAGS = {
    "--model": "model.name", "--data": "data.path", "--split": "data.split", "--columns": "data.columns",
    "--ratings": Flag("data.ratings", convert=comma_list("data.ratings"), metavar="A,B,..."),
    "--sample": "data.sample", "--seed": "data.seed", "--template": "data.template",
    "--max-length": "data.max_length", "--over-length": "data.over_length", "--on-error": "data.on_error",
}


def _field(cls: type, key: str):
    obj: Any = cls()
    *parents, leaf = key.split(".")
    for name in parents:
        obj = getattr(obj, name)
    f = {f.name: f for f in dataclasses.fields(obj)}[leaf]
    return f, getattr(obj, leaf), typing.get_type_hints(type(obj))[leaf]


def add_config_arguments(p: argparse.ArgumentParser, cls: type, flags: dict[str, str | Flag],
                         overrides: bool = True) -> None:
    """--config FILE, positional KEY=VALUE overrides and ``flags`` (flag -> key or ``Flag``) on ``p``;
    the epilog lists every key of ``cls`` with its default."""
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys (listed below); flags and "
                                                    "KEY=VALUE overrides take precedence")
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="set any config key listed below, e.g. "
                                                                         "batch.layout=kv")
    for flag, spec in flags.items():
        spec = spec if isinstance(spec, Flag) else Flag(spec)
        f, default, hint = _field(cls, spec.key)
        kwargs: dict[str, Any] = {"dest": f"flag::{flag}", "default": argparse.SUPPRESS}
        text = spec.help or f.metadata.get("help", "")
        shown = list(default) if isinstance(default, tuple) else default
        kwargs["help"] = f"{text} ({spec.key}; default: {shown!r})".replace("%", "%%")
        if spec.action:
            kwargs["action"] = spec.action
        else:
            if hint in (int, float):
                kwargs["type"] = hint
            elif typing.get_origin(hint) is not None and int in typing.get_args(hint):
                kwargs["type"] = int  # int | None
            if f.metadata.get("choices") is not None and spec.convert is None:
                kwargs["choices"] = f.metadata["choices"]
            if spec.nargs is not None:
                kwargs["nargs"] = spec.nargs
        if spec.action not in ("store_true", "store_false"):
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
            elif "choices" not in kwargs:  # the dest is internal (flag::--name): name the value after the flag
                kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        p.add_argument(flag, **kwargs)
    p.set_defaults(flag_specs={k: (v if isinstance(v, Flag) else Flag(v)) for k, v in flags.items()}, job=cls)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "config keys (defaults):\n" + rconfig.describe(cls).replace("%", "%%")


def config_from_args(cls: type, args: argparse.Namespace):
    """The job's config: its defaults, then --config FILE, then the flags given, then KEY=VALUE."""
    config = rconfig.apply(cls(), getattr(args, "config", None))
    specs: dict[str, Flag] = getattr(args, "flag_specs", {})
    for flag, spec in specs.items():
        dest = f"flag::{flag}"
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        pairs = spec.convert(value) if spec.convert else [(spec.key, list(value) if isinstance(value, tuple)
                                                           else value)]
        for key, v in pairs:
            rconfig.set_key(config, key, v, flag)
    rconfig.apply(config, None, getattr(args, "overrides", None) or ())
    return rconfig.validate(config, "command line")
