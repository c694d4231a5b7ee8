"""Strict dict -> dataclass configs: unknown keys are errors with a "did you mean"."""

from __future__ import annotations

import pytest

from moekit import MoEConfig, SoftMoEConfig
from moekit.config import config_from_dict, config_to_dict, suggest


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
