"""Helpers for typed configs: dataclasses built from plain dicts (TOML sections) with strict key checking.

Unknown keys are errors with a "did you mean" suggestion, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["config_from_dict", "config_to_dict", "suggest"]


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(cls: type[T], values: dict[str, Any], section: str | None = None) -> T:
    """Build dataclass ``cls`` from ``values``, refusing unknown keys with a clear ``ValueError``."""
    if not isinstance(values, dict):
        where = f"[{section}]" if section else cls.__name__
        raise ValueError(f"{where} must be a table of key = value pairs, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            where = f"{section}.{key}" if section else key
            raise ValueError(f"unknown config key {where!r}{suggest(key, names)}; valid keys: {', '.join(names)}")
    try:
        return cls(**values)
    except TypeError as exc:  # e.g. a missing required field
        raise ValueError(f"{section or cls.__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (None values dropped, since TOML has no null)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
