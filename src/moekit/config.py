"""Helpers for typed configs: dataclasses built from plain dicts (TOML sections) with strict key checking, and the
value checks every config's ``__post_init__`` uses.

Unknown keys are errors with a "did you mean" suggestion, so a typo never silently falls back to a default. Each
``check_*`` raises a :class:`~moekit.errors.ConfigError` (a ``ValueError``) reading ``"<name> must be <rule>, got
<value>"``; ``name`` is what the user wrote (``"train.lr"`` in a run config, ``"r"`` for a keyword argument).
``bool`` is never accepted as a number, although Python counts it as an ``int``: ``top_k = true`` is a mistake,
not 1. Numbers are finite (``inf`` and ``nan`` are never a learning rate or a width) and integers fit in 64 bits (they
end up in tensors and seeds).

:func:`config_from_dict` reports every problem of a table at once (:class:`ConfigProblems`): the unknown keys, the
values of the wrong type (checked against the field's annotation, so a field whose ``__post_init__`` forgets a check
still refuses ``"false"`` for a boolean), and the range errors ``__post_init__`` raises, found by building the
dataclass again without each key it refused (:func:`collect_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from moekit.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "ConfigProblems",
    "INT64_MAX",
    "MAX_LAYERS",
    "MAX_SEQ_LEN",
    "collect_config",
    "config_from_dict",
    "config_repr",
    "config_to_dict",
    "is_finite_number",
    "problem_key",
    "suggest",
    "type_problem",
    "check_at_most",
    "check_bool",
    "check_positive_int",
    "check_int",
    "check_number",
    "check_positive_number",
    "check_non_negative",
    "check_unit_interval",
    "check_choice",
]

# The largest value a signed 64-bit integer holds: integers of a config become tensor elements, numpy seeds and
# step counters, none of which take more.
INT64_MAX = 2**63 - 1
# Bounds on sizes that checks and counts loop over in Python (the blocks of a layout, the positions of a window): a
# value within 64 bits but beyond these would hang the check instead of failing it. Both are far beyond anything
# trainable (the deepest transformers trained have about 1,000 layers, the longest contexts about a million tokens),
# so no real config meets them; a model near them is refused by the memory estimate anyway.
MAX_LAYERS = 100_000
MAX_SEQ_LEN = 2**20


class ConfigProblems(ConfigError):
    """Several config problems reported at once. ``problems`` holds one line per problem, each naming its key;
    the message is that line alone for one problem, else a first line saying how many followed by one line each
    (the command line prints it as it is)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the config:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------------------------
# types from annotations


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # The config modules use `from __future__ import annotations`, so the annotations are strings until resolved.
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no type checks for this class, the values still are
        return {}


def _fits_int64(value: int) -> bool:
    return -INT64_MAX - 1 <= value <= INT64_MAX


def _scalar_problem(kind: type, value: object) -> bool:
    """Whether ``value`` is not of ``kind`` (one of bool, int, float, str): an int is no bool, a bool no int, a
    float finite, an int within 64 bits."""
    if kind is bool:
        return not isinstance(value, bool)
    if kind is int:
        return not (_is_int(value) and _fits_int64(value))
    if kind is float:
        return not (_is_number(value) and _is_finite(value))
    return not isinstance(value, str)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def type_problem(annotation: Any, value: object) -> str | None:
    """What ``value`` should have been when it is not of the field type ``annotation`` (``"true or false"``,
    ``"a finite number or \"none\""``, ``"a list of integers"``), else None. Only the types a config file
    can spell are checked: bool, int, float, str, lists of them and their optionals; other annotations (a nested
    config dataclass) pass."""
    args: tuple[Any, ...] = (annotation,)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    if value is None:
        # Optional: fine. Otherwise left to the dataclass: a run config spells None "none", which is also a
        # string choice of some fields (model.qk_norm = "none" arrives as None and means "none").
        return None
    if len(kinds) != 1:
        return None  # a union of several types: left to the dataclass's own checks
    kind = kinds[0]
    none = ' or "none"' if optional else ""
    if kind in _EXPECTED:
        if not _scalar_problem(kind, value):
            return None
        if kind is bool and optional:
            return 'true, false or "none"'
        if kind is int and _is_int(value):
            return f"an integer within 64 bits (|x| < 2**63){none}"
        return f"{_EXPECTED[kind]}{none}"
    if typing.get_origin(kind) in (list, tuple):
        inner = typing.get_args(kind)[:1]
        element = inner[0] if inner else None
        if element not in _EXPECTED:
            return None
        ok = isinstance(value, (list, tuple)) and not any(_scalar_problem(element, v) for v in value)
        noun = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}[element]
        return None if ok else f"a list of {noun}{none}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# dict -> dataclass, every problem at once

_UNKNOWN = re.compile(r"unknown config key '([\w.]+)'")
_LEAD = re.compile(r"[A-Za-z_][\w.]*")


def problem_key(message: str, names: Sequence[str], section: str | None = None) -> str | None:
    """The field a problem line is about: the key of an "unknown config key" line, else the field name the line
    starts with (``"top_k must be ..."``, ``"train.lr must be ..."``, with ``section.`` dropped); None when the
    line starts with no field of ``names``."""
    match = _UNKNOWN.match(message) or _LEAD.match(message)
    if match is None:
        return None
    token = match.group(1) if match.re is _UNKNOWN else match.group(0)
    if section and token.startswith(section + "."):
        token = token[len(section) + 1:]
    return token if token in names else None


def _qualify(message: str, names: Sequence[str], section: str | None) -> str:
    # Dataclass checks name bare fields ("top_k must be ..."): in a run config the line names the key as written
    # in the file ("moe.top_k must be ...").
    lead = _LEAD.match(message)
    if section and lead and lead.group(0) in names:
        return f"{section}.{message}"
    return message


def _mentions(message: str, key: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", message) is not None


def collect_config(
    cls: type[T], values: object, section: str | None = None
) -> tuple[T | None, list[str], set[str]]:
    """Build dataclass ``cls`` from ``values`` and collect every problem instead of stopping at the first.

    Returns ``(config, problems, replaced)``: ``config`` is built from the keys that passed, each refused key
    replaced by its default (None when that is impossible: a required field was refused or missing, or a check
    named no field); ``problems`` are the lines, each naming its key (``"section.key must be ..."``); ``replaced``
    the keys whose value was refused.

    Order: unknown keys, missing required fields, then the dataclass's own checks (their messages name the rule):
    each one it raises names a field (:func:`problem_key`), which is dropped before the dataclass is built again,
    until it builds. A check that fails with a ``TypeError`` (a comparison of a string with a number) and a value
    that the dataclass let through are found by the field's annotation (:func:`type_problem`). A later problem
    that mentions a replaced key is a consequence of the default standing in for the user's value (``topk_groups
    must be <= num_expert_groups=1``), not a problem of the file, and is not reported.
    """
    where = f"[{section}]" if section else cls.__name__
    if not isinstance(values, dict):
        return None, [f"{where} must be a table of key = value pairs, got {type(values).__name__}"], set()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    names = list(fields)
    hints = _type_hints(cls)
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}

    def qualified(key: str) -> str:
        return f"{section}.{key}" if section else key

    problems: list[str] = []
    replaced: set[str] = set()
    values = dict(values)
    for key in list(values):
        if key not in fields:
            problems.append(
                f"unknown config key {qualified(key)!r}{suggest(key, names)}; valid keys: {', '.join(names)}"
            )
            del values[key]
    missing = [n for n in names if n in required and n not in values]
    problems.extend(f"{qualified(n)} is required (it has no default)" for n in missing)
    if missing:
        return None, problems, replaced

    def note(message: str) -> None:
        # A line that mentions a replaced key judges the default standing in for the user's value: left out.
        if message not in problems and not any(_mentions(message, k) or _mentions(message, qualified(k))
                                               for k in replaced):
            problems.append(message)

    def drop(key: str) -> None:
        del values[key]
        replaced.add(key)

    def wrong_types(skip: str | None = None) -> list[str]:
        return [k for k in values if k != skip and type_problem(hints.get(k), values[k]) is not None]

    def type_line(key: str) -> str:
        return f"{qualified(key)} must be {type_problem(hints.get(key), values[key])}, got {values[key]!r}"

    def stop(key: str | None) -> tuple[None, list[str], set[str]]:
        # Cannot be built: still report the other values of the wrong type.
        for k in wrong_types(skip=key):
            note(type_line(k))
        return None, problems, replaced

    for _ in range(len(values) + 1):
        try:
            config = cls(**values)
        except ConfigError as exc:
            message = _qualify(str(exc), names, section)
            key = problem_key(message, names, section)
            note(message)
            if key is None or key not in values or key in required:
                return stop(key)
            drop(key)
            continue
        except TypeError as exc:  # a check compared a value of the wrong type: find it by the annotations
            bad = [k for k in wrong_types() if k not in required]
            if not bad:
                note(f"{section or cls.__name__}: {exc}")
                return stop(None)
            for key in bad:
                note(type_line(key))
                drop(key)
            continue
        # Built: a value of the wrong type the dataclass let through is still refused (a field without its own
        # check, or one whose check reads "false" as true).
        for key in wrong_types():
            note(type_line(key))
        return config, problems, replaced
    return stop(None)


def config_from_dict(cls: type[T], values: dict[str, Any], section: str | None = None) -> T:
    """Build dataclass ``cls`` from ``values``; every problem (unknown keys with a "did you mean", values of the
    wrong type, failed checks) is reported at once in one :class:`ConfigProblems` (see :func:`collect_config`)."""
    config, problems, _ = collect_config(cls, values, section)
    if problems:
        raise ConfigProblems(problems)
    assert config is not None  # no problem means it was built
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (None values dropped, since TOML has no null)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# value checks


def config_repr(config: Any) -> str:
    """``Name(field=value, ...)`` with only the fields that differ from their defaults (required fields always):
    what a person set, readable in a log line, instead of every one of 30 fields. A field whose default is None and
    whose value ``__post_init__`` derived from the others (``head_dim``, ``topk_groups``) is left out when setting it
    back to None derives the same value. The result still evaluates to an equal config."""
    fields = dataclasses.fields(config)
    shown: dict[str, Any] = {}
    derived: list[str] = []
    for f in fields:
        value = getattr(config, f.name)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            shown[f.name] = value
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value == default and type(value) is type(default):
            continue
        shown[f.name] = value
        if default is None:
            derived.append(f.name)
    for name in derived:
        try:  # the config again with this field None: when it derives the same value, the value was not set
            again = dataclasses.replace(config, **{name: None})
        except (ValueError, TypeError):
            continue
        if getattr(again, name) == shown[name]:
            del shown[name]
    return f"{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    # math.isfinite(10**400) raises OverflowError (it converts to float first): such an int is not finite here.
    if isinstance(value, int):
        return _fits_int64(value)
    return math.isfinite(value)


def is_finite_number(value: object) -> bool:
    """An ``int`` (not a bool) within 64 bits or a finite ``float``: a value ``float()`` takes and no check has to
    fear (``float(10**400)`` raises OverflowError)."""
    return _is_number(value) and _is_finite(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object) -> None:
    """A real ``bool``: ``"<name> must be true or false, got <value>"`` (the string ``"false"`` and 0 / 1 are
    refused: a string is truthy, and a number is not a switch)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def check_positive_int(name: str, value: object) -> None:
    """An ``int`` in [1, 2**63 - 1]: ``"<name> must be a positive integer, got <value>"``."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value > INT64_MAX:
        raise ConfigError(f"{name} must be a positive integer below 2**63, got {value!r}")


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    """An ``int`` >= ``minimum`` (and <= ``maximum``, always <= 2**63 - 1): ``"<name> must be an integer >=
    <minimum>, got <value>"``, or ``"... an integer in [<minimum>, <maximum>], ..."`` with an upper bound."""
    high = INT64_MAX if maximum is None else min(maximum, INT64_MAX)
    if _is_int(value) and minimum <= value <= high:
        return
    if maximum is None and not (_is_int(value) and value > INT64_MAX):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    shown = "2**63 - 1" if high == INT64_MAX else str(high)
    raise ConfigError(f"{name} must be an integer in [{minimum}, {shown}], got {value!r}")


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
    """A finite ``int`` or ``float`` within the bounds given (NaN and infinities never are): ``"<name> must be a
    number > 0, got ..."`` for one bound, ``"... a number in [0, 1), ..."`` for two, ``"... a finite number > 0,
    ..."`` for a non-finite value. ``expected`` replaces the words after "must be" where a message's wording is
    fixed elsewhere."""
    ok = _is_number(value)
    finite = ok and _is_finite(value)  # type: ignore[arg-type]
    ok = finite
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
        if _is_number(value) and not finite:
            # "lr must be a number > 0, got inf" reads as a contradiction: say what is wrong with it.
            expected = "a finite " + expected[2:] if expected.startswith("a number") else f"finite and {expected}"
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def check_at_most(name: str, value: int, maximum: int, what: str) -> None:
    """``value`` (already checked to be an int) <= ``maximum``: ``"<name> must be <= <maximum> (<what>), got
    <value>"``; ``what`` says why the bound is there."""
    if value > maximum:
        raise ConfigError(f"{name} must be <= {maximum:,} ({what}), got {value!r}")


def check_positive_number(name: str, value: object) -> None:
    """A finite number > 0: ``"<name> must be a number > 0, got <value>"``."""
    check_number(name, value, low=0, low_open=True)


def check_non_negative(name: str, value: object) -> None:
    """A finite number >= 0: ``"<name> must be a number >= 0, got <value>"``."""
    check_number(name, value, low=0)


def check_unit_interval(name: str, value: object) -> None:
    """A number in [0, 1) (a dropout or jitter rate): ``"<name> must be in [0, 1), got <value>"``."""
    check_number(name, value, low=0, high=1, high_open=True, expected="in [0, 1)")


def check_choice(name: str, value: object, choices: Sequence[Any]) -> None:
    """One of ``choices``: ``"<name> must be one of <choices>, got <value>"`` (``choices`` printed as given)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
