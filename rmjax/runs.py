"""Run directories: the one durable write every job's outputs go through.

    atomic_write(path, lambda tmp: tmp.write_text(...))   the file is either the old one or the whole new one
    write_json(path, data)                                  the same for a JSON record (metadata, a stage's record)

A file is written to ``.<name>.<pid>.tmp`` beside it, flushed to disk, renamed over the target and
the directory entry flushed too, so a killed process leaves the previous version or the complete
new one, never a torn file; a resumed job reads only what was written whole.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """``write(tmp)``, fsync, rename over ``path``, fsync the directory: ``path`` is old or whole.
    ``mode``: the file's permissions (e.g. 0o644 for a shared cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """``data`` as indented JSON, written atomically (NumPy arrays and scalars as lists and numbers)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=_jsonable) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, "utf-8"))
