"""The code's shape: every command's --help runs and documents exactly its config's keys (each flag sets
a key that exists), and the packages import each other one way only, never a private name across
packages."""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import pytest

from rmjax import config as rconfig
from rmjax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1] / "rmjax"


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*prefix, name))
            return
    yield prefix, parser


COMMANDS = list(_subcommands(build_parser()))


@pytest.mark.parametrize("words, parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_help_runs_and_every_flag_sets_a_key_of_its_config(words, parser):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        build_parser().parse_args([*words, "--help"])
    assert done.value.code == 0
    text = out.getvalue()
    assert "flag::" not in text.lower() and "%%" not in text  # no internal names, no doubled percent signs
    specs = parser.get_default("flag_specs")
    if specs is None:  # a command over one library function without a config of its own
        return
    cls = parser.get_default("job")
    listed = [line.split(" = ")[0].strip() for line in text.split("config keys (defaults):", 1)[1].splitlines()
              if " = " in line]
    assert listed == [key for key, _, _ in rconfig.keys(cls)]  # every key, in order, with its default
    for flag, spec in specs.items():
        rconfig.set_key(cls(), spec.key, _default(cls, spec.key), flag)  # the key exists and takes its type


SCRIPTS = sorted((ROOT.parent / "experiments").glob("*/*.py")) + [ROOT.parent / "tools" / "readme_tables.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_every_experiment_driver_help_runs(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "Traceback" not in done.stderr


def _default(cls, key: str):
    obj = cls()
    for name in key.split("."):
        obj = getattr(obj, name)
    return list(obj) if isinstance(obj, tuple) else obj


def _imports():
    """(importing module, imported module, names, at module level) of every rmjax import."""
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rmjax"):
                yield module, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("rmjax"):
                        yield module, a.name, []


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_packages_import_each_other_one_way_only():
    edges: dict[str, set[str]] = {}
    for a, b, _ in _imports():
        if _package(a) != _package(b):
            edges.setdefault(_package(a), set()).add(_package(b))

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == goal:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = {tuple(sorted(set(c))) for p in edges for c in [reaches(p, p)] if c}
    assert not circles, f"import circles between packages: {sorted(circles)}"


def test_rmjax_imports_sit_at_module_top_unless_a_comment_says_why():
    """A function-level import of rmjax hides a dependency from the reader; the few that stay (a heavy
    optional library, a late import that keeps two modules from importing each other at load) say why
    on the line above."""
    unexplained = []
    for path in ROOT.rglob("*.py"):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for parent in ast.walk(tree):
            if isinstance(parent, ast.Module) or (isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test)):
                continue
            for node in ast.iter_child_nodes(parent):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "rmjax" in ast.unparse(node):
                    above = lines[node.lineno - 2].strip()  # a comment, or the import before it (one block)
                    if not above.startswith(("#", "from rmjax")):
                        unexplained.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not unexplained, f"function-level rmjax imports without a comment saying why: {unexplained}"


def test_no_private_name_is_imported_across_packages():
    crossing = [(a, b, n) for a, b, names in _imports() for n in names
                if n.startswith("_") and not n.startswith("__") and _package(a) != _package(b)]
    assert not crossing, crossing


def test_every_section_field_is_documented():
    from rmjax.jobs import armorm, eval_rm, features, logprobs, score, vocab_scan
    from rmjax.train.config import TrainConfig

    for cls in (score.ScoreConfig, vocab_scan.VocabScanConfig, features.FeaturesConfig, eval_rm.EvalConfig,
                logprobs.LogprobsConfig, TrainConfig, armorm.RegressionConfig, armorm.EvaluateConfig):
        undocumented = [key for key, _, text in rconfig.keys(cls) if not text and not key.startswith("settings.")]
        assert not undocumented, (cls.__name__, undocumented)
        assert dataclasses.is_dataclass(cls)
