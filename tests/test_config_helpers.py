"""Strict dict -> dataclass configs: unknown keys are errors with a "did you mean"; the shared value checks."""

from __future__ import annotations

import pytest

from moekit import MoEConfig, SoftMoEConfig
from moekit.config import (
    check_choice,
    check_int,
    check_non_negative,
    check_number,
    check_positive_int,
    check_positive_number,
    check_unit_interval,
    config_from_dict,
    config_to_dict,
    suggest,
)


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
    with pytest.raises(ValueError, match=r"moe: .*missing .*'num_experts'"):
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
        (lambda v: check_positive_number("x", v), float("nan"), "x must be a number > 0, got nan"),
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
