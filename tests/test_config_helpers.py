"""Strict dict -> dataclass configs: unknown keys are errors with a "did you mean", every problem of a table is
reported at once; the shared value checks (finite numbers, 64-bit integers, real booleans)."""

from __future__ import annotations

import dataclasses

import pytest

from moekit import MoEConfig, SoftMoEConfig
from moekit.config import (
    INT64_MAX,
    ConfigProblems,
    check_bool,
    check_choice,
    check_int,
    check_non_negative,
    check_number,
    check_positive_int,
    check_positive_number,
    check_unit_interval,
    collect_config,
    config_from_dict,
    config_to_dict,
    suggest,
    type_problem,
)
from moekit.errors import ConfigError


def test_builds_and_validates():
    c = config_from_dict(MoEConfig, {"d_model": 8, "d_ff": 16, "num_experts": 4, "top_k": 2})
    assert isinstance(c, MoEConfig) and c.top_k == 2 and c.num_experts == 4


def test_unknown_key_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown config key 'num_expert' \(did you mean 'num_experts'\?\)"):
        config_from_dict(MoEConfig, {"d_model": 8, "d_ff": 16, "num_expert": 4})


def test_unknown_key_with_section():
    with pytest.raises(
        ValueError, match=r"unknown config key 'moe.capacity_facter' \(did you mean 'capacity_factor'\?\)"
    ):
        config_from_dict(MoEConfig, {"d_model": 8, "capacity_facter": 1.0}, section="moe")


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError) as info:
        config_from_dict(SoftMoEConfig, {"zzz": 1})
    msg = str(info.value)
    assert "unknown config key 'zzz'" in msg and "did you mean" not in msg
    assert "valid keys: d_model, d_ff, num_experts, slots_per_expert" in msg


def test_missing_required_field_is_value_error():
    with pytest.raises(ValueError, match=r"^moe.num_experts is required \(it has no default\)$"):
        config_from_dict(MoEConfig, {"d_model": 8, "d_ff": 16}, section="moe")


def test_not_a_table():
    with pytest.raises(ValueError, match=r"\[moe\] must be a table of key = value pairs, got list"):
        config_from_dict(MoEConfig, [1, 2], section="moe")


def test_validation_errors_pass_through():
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts=2, got top_k=3"):
        config_from_dict(MoEConfig, {"d_model": 8, "d_ff": 16, "num_experts": 2, "top_k": 3})


def test_suggest():
    assert suggest("top_kk", ["top_k", "d_model"]) == " (did you mean 'top_k'?)"
    assert suggest("qqq", ["top_k", "d_model"]) == ""


def test_to_dict_round_trip_drops_none():
    c = MoEConfig(d_model=8, d_ff=16, num_experts=4, capacity_factor=None)
    d = config_to_dict(c)
    assert "capacity_factor" not in d and "group_size" not in d and "normalize_gates" not in d
    assert d["d_model"] == 8 and d["top_k"] == 1
    # capacity_factor comes back at its default (1.0), not None: TOML has no null.
    back = config_from_dict(MoEConfig, d)
    assert back.capacity_factor == 1.0 and back.d_model == 8


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: check_positive_int("model.d_ff", v), 0, "model.d_ff must be a positive integer, got 0"),
        (lambda v: check_positive_int("top_k", v), True, "top_k must be a positive integer, got True"),
        (lambda v: check_positive_int("top_k", v), 2.0, "top_k must be a positive integer, got 2.0"),
        (lambda v: check_int("train.seed", v, 0), -1, "train.seed must be an integer >= 0, got -1"),
        (lambda v: check_positive_number("model.norm_eps", v), 0, "model.norm_eps must be a number > 0, got 0"),
        (lambda v: check_positive_number("x", v), float("nan"), "x must be a finite number > 0, got nan"),
        (lambda v: check_non_negative("model.z_loss_coef", v), -1, "model.z_loss_coef must be a number >= 0, got -1"),
        (lambda v: check_non_negative("c", v), "1", "c must be a number >= 0, got '1'"),
        (lambda v: check_unit_interval("jitter_eps", v), 1.0, "jitter_eps must be in [0, 1), got 1.0"),
        (lambda v: check_unit_interval("dropout", v), False, "dropout must be in [0, 1), got False"),
        (lambda v: check_number("f", v, low=0, high=0.5, low_open=True, high_open=True), 0.5,
         "f must be a number in (0, 0.5), got 0.5"),
        (lambda v: check_number("b", v, low=0.0, high=1.0), 1.5, "b must be a number in [0.0, 1.0], got 1.5"),
        (lambda v: check_number("a", v, low=0, low_open=True, expected="a positive number"), -1.0,
         "a must be a positive number, got -1.0"),
        (lambda v: check_choice("pool", v, ("mean", "cls")), "max", "pool must be one of ('mean', 'cls'), got 'max'"),
    ],
)
def test_value_checks_name_the_rule_and_the_value(check, value, message):
    with pytest.raises(ValueError) as info:
        check(value)
    assert str(info.value) == message


def test_value_checks_accept_good_values():
    check_positive_int("n", 1)
    check_int("n", 0, 0)
    check_positive_number("x", 1e-9)
    check_non_negative("x", 0)
    check_unit_interval("p", 0.0)
    check_number("b", 1.0, low=0.0, high=1.0)
    check_choice("k", "cls", ("mean", "cls"))


# ---------------------------------------------------------------------------------------------------------------
# finite numbers, 64-bit integers, real booleans


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("inf"), "lr must be a finite number > 0, got inf"),
        (float("-inf"), "lr must be a finite number > 0, got -inf"),
        (float("nan"), "lr must be a finite number > 0, got nan"),
        (10**400, f"lr must be a finite number > 0, got {10**400!r}"),
    ],
)
def test_check_number_refuses_values_that_are_not_finite(value, message):
    with pytest.raises(ValueError) as info:
        check_positive_number("lr", value)
    assert str(info.value) == message


def test_check_number_with_fixed_wording_says_finite():
    with pytest.raises(ValueError) as info:
        check_number("init_scale", float("inf"), low=0, low_open=True, expected="> 0")
    assert str(info.value) == "init_scale must be finite and > 0, got inf"


def test_check_int_upper_bounds():
    with pytest.raises(ValueError) as info:
        check_int("train.threads", 100000, 0, 1024)
    assert str(info.value) == "train.threads must be an integer in [0, 1024], got 100000"
    with pytest.raises(ValueError) as info:
        check_int("train.seed", 2**64, 0)  # no explicit maximum: still 64 bits at most
    assert str(info.value) == f"train.seed must be an integer in [0, 2**63 - 1], got {2**64}"
    with pytest.raises(ValueError) as info:
        check_positive_int("d_model", 2**63)
    assert str(info.value) == f"d_model must be a positive integer below 2**63, got {2**63}"
    check_int("train.seed", INT64_MAX, 0)
    check_int("train.threads", 1024, 0, 1024)


@pytest.mark.parametrize("value", ["false", "true", 0, 1, 3, None, [True]])
def test_check_bool_takes_only_booleans(value):
    with pytest.raises(ValueError) as info:
        check_bool("train.tensorboard", value)
    assert str(info.value) == f"train.tensorboard must be true or false, got {value!r}"


def test_check_bool_accepts_booleans():
    check_bool("x", True)
    check_bool("x", False)


@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        (bool, "false", "true or false"),
        (bool, 1, "true or false"),
        (bool | None, 3, 'true, false or "none"'),
        (int, True, "an integer"),
        (int, 1.0, "an integer"),
        (int, 2**64, "an integer within 64 bits (|x| < 2**63)"),
        (int | None, "4", 'an integer or "none"'),
        (float, float("inf"), "a finite number"),
        (float, float("nan"), "a finite number"),
        (float, "0.1", "a finite number"),
        (float, False, "a finite number"),
        (float | None, [1.0], 'a finite number or "none"'),
        (str, 3, "a string"),
        (list[int], [1, True], "a list of integers"),
        (list[int], "1", "a list of integers"),
    ],
)
def test_type_problem_names_what_was_expected(annotation, value, expected):
    assert type_problem(annotation, value) == expected


@pytest.mark.parametrize(
    ("annotation", "value"),
    [(bool, False), (int, 3), (float, 3), (float, 0.5), (str, "x"), (int | None, None), (list[int], [0, 2]),
     (MoEConfig | None, "anything: nested configs are checked by their own class")],
)
def test_type_problem_accepts_values_of_the_type(annotation, value):
    assert type_problem(annotation, value) is None


# ---------------------------------------------------------------------------------------------------------------
# every problem at once


def test_config_from_dict_reports_every_problem_of_a_table_at_once():
    values = {"d_model": 8, "d_ff": 16, "num_experts": 4, "top_kk": 2, "jitter_eps": 2.0, "normalize_gates": "false",
              "init_scale": float("inf")}
    with pytest.raises(ConfigProblems) as info:
        config_from_dict(MoEConfig, values, section="moe")
    lines = str(info.value).splitlines()
    assert lines[0] == "4 problems in the config:"
    assert lines[1].startswith("  unknown config key 'moe.top_kk' (did you mean 'top_k'?)")
    assert sorted(lines[2:]) == sorted([
        "  moe.normalize_gates must be true, false or none, got 'false'",
        "  moe.jitter_eps must be in [0, 1), got 2.0",
        "  moe.init_scale must be finite and > 0, got inf",
    ])
    assert len(info.value.problems) == 4


def test_one_problem_is_one_line():
    with pytest.raises(ConfigProblems) as info:
        config_from_dict(MoEConfig, {"d_model": 8, "d_ff": 16, "num_experts": 4, "top_k": 0}, section="moe")
    assert str(info.value) == "moe.top_k must be a positive integer, got 0"


def test_a_consequence_of_a_refused_value_is_not_reported():
    # num_expert_groups = 3 cannot split 8 experts; with its default (1) standing in, topk_groups = 2 would fail
    # too, but only because of the default: one problem, not two.
    values = {"d_model": 8, "d_ff": 16, "num_experts": 8, "num_expert_groups": 3, "topk_groups": 2}
    with pytest.raises(ConfigProblems) as info:
        config_from_dict(MoEConfig, values, section="moe")
    assert info.value.problems == [
        "moe.num_expert_groups must split num_experts=8 into equal groups of at least 2 experts (a group is scored "
        "by its two best), got 3"
    ]


@dataclasses.dataclass
class _Unchecked:
    """A config whose ``__post_init__`` checks nothing: the annotations still refuse values of the wrong type."""

    flag: bool = False
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    limit: int | None = None


def test_values_the_dataclass_lets_through_are_refused_by_their_annotation():
    values = {"flag": "false", "count": True, "rate": float("nan"), "name": 3, "limit": 2**70}
    config, problems, replaced = collect_config(_Unchecked, values, "s")
    assert problems == [
        "s.flag must be true or false, got 'false'",
        "s.count must be an integer, got True",
        "s.rate must be a finite number, got nan",
        "s.name must be a string, got 3",
        f's.limit must be an integer within 64 bits (|x| < 2**63) or "none", got {2**70}',
    ]
    assert replaced == set() and config is not None  # built (nothing raised), but the caller refuses it
    assert collect_config(_Unchecked, {"flag": True, "count": 2}, "s")[1] == []


def test_a_type_error_inside_a_check_becomes_a_problem_naming_the_key():
    @dataclasses.dataclass
    class Compares:
        low: float = 0.0

        def __post_init__(self) -> None:
            if self.low > 1:  # a str here raises TypeError, not ConfigError
                raise ConfigError(f"low must be <= 1, got {self.low}")

    with pytest.raises(ConfigProblems) as info:
        config_from_dict(Compares, {"low": "0.5"}, "x")
    assert str(info.value) == "x.low must be a finite number, got '0.5'"
