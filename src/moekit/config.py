"""Helpers for typed configs: dataclasses built from plain dicts (TOML sections) with strict key checking, and the
value checks every config's ``__post_init__`` uses.

Unknown keys are errors with a "did you mean" suggestion, so a typo never silently falls back to a default. Each
``check_*`` raises a :class:`~moekit.errors.ConfigError` (a ``ValueError``) reading ``"<name> must be <rule>, got
<value>"``; ``name`` is what the user wrote (``"train.lr"`` in a run config, ``"r"`` for a keyword argument).
``bool`` is never accepted as a number, although Python counts it as an ``int``: ``top_k = true`` is a mistake,
not 1.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any, TypeVar

from moekit.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "config_from_dict",
    "config_to_dict",
    "suggest",
    "check_positive_int",
    "check_int",
    "check_number",
    "check_positive_number",
    "check_non_negative",
    "check_unit_interval",
    "check_choice",
]


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(cls: type[T], values: dict[str, Any], section: str | None = None) -> T:
    """Build dataclass ``cls`` from ``values``, refusing unknown keys with a clear :class:`ConfigError`."""
    if not isinstance(values, dict):
        where = f"[{section}]" if section else cls.__name__
        raise ConfigError(f"{where} must be a table of key = value pairs, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"unknown config key {where!r}{suggest(key, names)}; valid keys: {', '.join(names)}")
    try:
        return cls(**values)
    except TypeError as exc:  # e.g. a missing required field
        raise ConfigError(f"{section or cls.__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (None values dropped, since TOML has no null)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> None:
    """An ``int`` >= 1: ``"<name> must be a positive integer, got <value>"``."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_int(name: str, value: object, minimum: int) -> None:
    """An ``int`` >= ``minimum``: ``"<name> must be an integer >= <minimum>, got <value>"``."""
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    expected: str | None = None,
) -> None:
    """An ``int`` or ``float`` within the bounds given (NaN never is): ``"<name> must be a number > 0, got ..."``
    for one bound, ``"... a number in [0, 1), ..."`` for two. ``expected`` replaces the words after "must be"
    where a message's wording is fixed elsewhere."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if expected is None:
            if low is not None and high is not None:
                expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif low is not None:
                expected = f"a number {'>' if low_open else '>='} {low}"
            elif high is not None:
                expected = f"a number {'<' if high_open else '<='} {high}"
            else:
                expected = "a number"
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def check_positive_number(name: str, value: object) -> None:
    """A number > 0: ``"<name> must be a number > 0, got <value>"``."""
    check_number(name, value, low=0, low_open=True)


def check_non_negative(name: str, value: object) -> None:
    """A number >= 0: ``"<name> must be a number >= 0, got <value>"``."""
    check_number(name, value, low=0)


def check_unit_interval(name: str, value: object) -> None:
    """A number in [0, 1) (a dropout or jitter rate): ``"<name> must be in [0, 1), got <value>"``."""
    check_number(name, value, low=0, high=1, high_open=True, expected="in [0, 1)")


def check_choice(name: str, value: object, choices: Sequence[Any]) -> None:
    """One of ``choices``: ``"<name> must be one of <choices>, got <value>"`` (``choices`` printed as given)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
