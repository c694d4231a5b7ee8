"""Property test: every field of every run-config section refuses a value of the wrong type with a ConfigError that
names the key (never a TypeError / ValueError traceback, never silent acceptance), through the TOML path.

The wrong values are drawn by the field's annotation with a seeded ``random.Random`` (no hypothesis dependency):
a string for a number, a bool for an int, NaN / infinities for a float, integers beyond 64 bits, lists, numbers for a
string or a boolean. Each is written with ``to_toml``, read back with ``tomllib`` and given to ``build_run_config``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import types
import typing
from typing import Any

import pytest
import tomllib

from moekit.config import ConfigProblems
from moekit.errors import ConfigError
from moekit.lab.data.config import DataConfig, ImageDataConfig, Seq2SeqDataConfig
from moekit.lab.training.run_config import ParallelConfig, build_run_config, to_toml
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.models.config import LMConfig
from moekit.models.seq2seq_config import Seq2SeqConfig
from moekit.models.vit import ViTConfig
from moekit.training.config import TrainConfig

SEED = 18

# One valid base per task; a case sets one key of one section to a wrong value on top of it.
BASES: dict[str, dict[str, dict[str, Any]]] = {
    "lm": {"model": {}, "moe": {"num_experts": 4}},
    "vit": {"model": {"arch": "vit"}, "moe": {"num_experts": 4}},
    "vit-soft": {"model": {"arch": "vit"}, "moe": {"router": "soft", "num_experts": 4}},
    "seq2seq": {"model": {"arch": "seq2seq"}, "moe": {"num_experts": 4}},
}

# (base, section, dataclass, fields that are not keys of the section: set by the task, not by the user)
SECTIONS: list[tuple[str, str, type, tuple[str, ...]]] = [
    ("lm", "model", LMConfig, ("vocab_size", "moe")),
    ("lm", "moe", MoEConfig, ()),
    ("lm", "data", DataConfig, ()),
    ("lm", "train", TrainConfig, ()),
    ("lm", "parallel", ParallelConfig, ()),
    ("vit", "model", ViTConfig, ("moe",)),
    ("vit", "moe", MoEConfig, ()),
    ("vit-soft", "moe", SoftMoEConfig, ()),
    ("vit", "data", ImageDataConfig, ()),
    ("seq2seq", "model", Seq2SeqConfig, ("vocab_size", "encoder_moe", "decoder_moe")),
    ("seq2seq", "data", Seq2SeqDataConfig, ()),
]


def _kinds(annotation: Any) -> list[Any]:
    """The non-None types of a field annotation (``int | None`` -> ``[int]``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _strings(rng: random.Random) -> str:
    # Never "none" (a run config's spelling of None, valid for optional fields) nor a valid choice by chance.
    return rng.choice(["false", "true", "0", "1.5", "x", "", "inf", "gelu?", "[1]"])


def wrong_values(annotation: Any, rng: random.Random) -> list[Any]:
    """Values a TOML file can hold that are not of the field's type: one per kind of mistake."""
    kinds = _kinds(annotation)
    huge = rng.choice([2**63, 2**64 + rng.randrange(1000), -(2**70), 10**30])
    if kinds == [bool]:
        return [_strings(rng), rng.choice([0, 1, 3, -1]), rng.choice([0.0, 1.0]), [True], huge]
    if kinds == [int]:
        return [_strings(rng), rng.choice([True, False]), rng.choice([2.5, 1.0, -0.5]),
                rng.choice([math.nan, math.inf, -math.inf]), huge, [rng.randrange(4)]]
    if kinds == [float]:
        return [_strings(rng), rng.choice([True, False]), math.nan, rng.choice([math.inf, -math.inf]),
                10**400, [rng.random()]]
    if kinds == [str]:
        return [rng.randrange(100), rng.choice([True, False]), rng.random(), [_strings(rng)]]
    if typing.get_origin(kinds[0]) is list:
        return [_strings(rng), rng.randrange(4), [True], ["a"], [1.5], [huge]]
    return []  # a nested config (the [moe] section inside [model]): not a key


def _cases() -> list[tuple[str, str, str, Any]]:
    rng = random.Random(SEED)
    cases = []
    for base, section, cls, skip in SECTIONS:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in skip:
                continue
            for value in wrong_values(hints[field.name], rng):
                cases.append((base, section, field.name, value))
    return cases


CASES = _cases()


def _build(tables: dict[str, dict[str, Any]]) -> Any:
    """Through the TOML text, as a file would come."""
    return build_run_config(tomllib.loads(to_toml(tables)))


def test_the_bases_are_valid_and_every_field_is_fuzzed():
    for tables in BASES.values():
        _build(tables)
    fuzzed = {(section, cls, key) for (_, section, key, _) in CASES for (_, s, cls, _) in SECTIONS if s == section}
    assert len(CASES) > 500
    for _, section, cls, skip in SECTIONS:
        for field in dataclasses.fields(cls):
            assert field.name in skip or (section, cls, field.name) in fuzzed, (section, field.name)


def test_every_wrong_type_is_a_config_error_naming_its_key():
    failures = []
    for base, section, key, value in CASES:
        tables = {name: dict(values) for name, values in BASES[base].items()}
        tables.setdefault(section, {})[key] = value
        name = f"{section}.{key}"
        try:
            _build(tables)
        except ConfigError as exc:
            if name not in str(exc):
                failures.append(f"{base}: {name} = {value!r}: the error does not name the key: {exc}")
        except Exception as exc:  # a traceback the user would see
            failures.append(f"{base}: {name} = {value!r}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{base}: {name} = {value!r}: accepted")
    assert failures == []


@pytest.mark.parametrize("draw", range(20))
def test_wrong_values_in_several_sections_are_all_named_in_one_error(draw):
    # One wrong key in each of [model], [moe], [data], [train] and [parallel] of a language model: one error names
    # all five. moe.num_experts is left out: a required key that is refused stops the [moe] checks (nothing to build
    # the other keys with), which this property does not promise.
    rng = random.Random(SEED * 1000 + draw)
    tables: dict[str, dict[str, Any]] = {"model": {}, "moe": {"num_experts": 4}}
    named = []
    for base, section, cls, skip in SECTIONS:
        if base != "lm":
            continue
        hints = typing.get_type_hints(cls)
        keys = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.name != "num_experts"]
        key = rng.choice(keys)
        tables.setdefault(section, {})[key] = rng.choice(wrong_values(hints[key], rng))
        named.append(f"{section}.{key}")
    with pytest.raises(ConfigProblems) as info:
        _build(tables)
    message = str(info.value)
    assert message.splitlines()[0] == f"{len(info.value.problems)} problems in the config:"
    assert [name for name in named if name not in message] == [], message


class _Hung(Exception):
    pass


def _raise_hung(signum: int, frame: object) -> None:
    raise _Hung


def test_huge_values_within_64_bits_are_checked_quickly():
    # A number of the right type but absurd size (2**40 layers, a 2**62-token window) must be refused or estimated
    # at once: checks that loop over blocks or positions once hung on them. Each case gets 2 seconds.
    from moekit.lab.training.size import estimate_training_memory

    rng = random.Random(SEED)
    previous = signal.signal(signal.SIGALRM, _raise_hung)
    failures = []
    try:
        for base, section, cls, skip in SECTIONS:
            hints = typing.get_type_hints(cls)
            for field in dataclasses.fields(cls):
                if field.name in skip or _kinds(hints[field.name]) not in ([int], [float]):
                    continue
                tables = {name: dict(values) for name, values in BASES[base].items()}
                value = rng.choice([2**40, 2**62, 2**63 - 1])
                tables.setdefault(section, {})[field.name] = value
                signal.alarm(2)
                try:
                    estimate_training_memory(_build(tables))
                except ConfigError:
                    pass
                except _Hung:
                    failures.append(f"{base}: {section}.{field.name} = {value}: still checking after 2 s")
                except Exception as exc:
                    failures.append(f"{base}: {section}.{field.name} = {value}: {type(exc).__name__}: {exc}")
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert failures == []
