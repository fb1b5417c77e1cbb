"""Every number in README.md's result tables comes from a results file a command wrote: the tables are
re-rendered from those files (tools/readme_tables.py) and must match what the README says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "tools" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_their_results_files():
    tables = _tables()
    text = (ROOT / "README.md").read_text()
    changed = tables.render(text)[1]
    assert changed == [], f"README.md tables {changed} differ from their results files: python tools/readme_tables.py"
    assert {m.group(2) for m in tables.BLOCK.finditer(text)} == set(tables.TABLES)  # every renderer has its block


def test_a_changed_number_fails_the_check():
    tables = _tables()
    text = (ROOT / "README.md").read_text()
    block = next(tables.BLOCK.finditer(text))
    body = block.group(3)
    digit = next(i for i, c in enumerate(body) if c.isdigit() and i > body.index("|---"))
    tampered = text[: block.start(3) + digit] + str((int(body[digit]) + 1) % 10) + text[block.start(3) + digit + 1:]
    assert tables.render(tampered)[1] == [block.group(2)]
