"""Warnings of the value-bias analysis: input that was used with a change the user should know about."""
from __future__ import annotations

import warnings
from collections.abc import Iterable


class ValueBiasWarning(UserWarning):
    """Input was accepted but something was left out or merged; the message says what and how much."""


def warn(message: str) -> None:
    warnings.warn(message, ValueBiasWarning, stacklevel=3)


def examples(items: Iterable[object], limit: int = 5) -> str:
    """`a, b, c` or `a, b, c, ... (+7 more)`: enough names to act on without flooding the terminal."""
    items = list(items)
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
