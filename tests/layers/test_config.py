"""MoEConfig / SoftMoEConfig validation: every bad value is a ValueError naming the field and the value."""

from __future__ import annotations

import pytest

from moekit import MoE, MoEConfig, SoftMoE, SoftMoEConfig

BASE = {"d_model": 8, "d_ff": 16, "num_experts": 4}


def test_defaults():
    c = MoEConfig(**BASE)
    assert (c.top_k, c.capacity_factor, c.activation, c.router, c.min_capacity) == (1, 1.0, "gelu", "topk", 4)
    assert c.normalize_gates is None and c.group_size is None and c.init_scale == 0.1
    assert c.second_expert_policy == "all" and c.second_expert_threshold == 0.2
    assert c.router_dtype == "float32"
    s = SoftMoEConfig(**BASE)
    assert s.slots_per_expert == 1 and s.activation == "gelu"


def test_capacity_factor_int_becomes_float():
    c = MoEConfig(**BASE, capacity_factor=2)
    assert c.capacity_factor == 2.0 and isinstance(c.capacity_factor, float)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 5}, r"top_k must be <= num_experts=4, got top_k=5"),
        ({"top_k": 0}, r"top_k must be a positive integer, got 0"),
        ({"capacity_factor": 0.0}, r"capacity_factor must be > 0 \(or None for dropless\), got 0.0"),
        ({"capacity_factor": -1.0}, r"capacity_factor must be > 0 .* got -1.0"),
        ({"capacity_factor": float("inf")}, r"capacity_factor must be finite \(None for dropless\), got inf"),
        ({"capacity_factor": "1.25"}, r"capacity_factor must be a number or None, got '1.25'"),
        ({"capacity_factor": True}, r"capacity_factor must be a number or None, got True"),
        ({"activation": "tan"}, r"activation must be one of \[.*'swiglu'\], got 'tan'"),
        ({"router": "hash"}, r"router must be one of \('topk', 'expert_choice'\), got 'hash'"),
        ({"router": "expert_choice", "capacity_factor": None}, r"must be > 0 for .* got None"),
        ({"d_model": 0}, r"d_model must be a positive integer, got 0"),
        ({"d_ff": 2.5}, r"d_ff must be a positive integer, got 2.5"),
        ({"num_experts": True}, r"num_experts must be a positive integer, got True"),
        ({"min_capacity": -1}, r"min_capacity must be an integer >= 0, got -1"),
        ({"jitter_eps": 1.0}, r"jitter_eps must be in \[0, 1\), got 1.0"),
        ({"expert_dropout": -0.1}, r"expert_dropout must be in \[0, 1\), got -0.1"),
        ({"init_scale": 0}, r"init_scale must be > 0, got 0"),
        ({"group_size": 0}, r"group_size must be a positive integer, got 0"),
        ({"second_expert_policy": "some"}, r"second_expert_policy must be one of .* got 'some'"),
        ({"second_expert_threshold": 0}, r"second_expert_threshold must be > 0, got 0"),
        ({"router_dtype": "fp16"}, r"router_dtype must be one of .* got 'fp16'"),
        ({"router": "expert_choice", "batch_priority": True}, r"apply to router='topk' only"),
        ({"router": "expert_choice", "noisy_gating": True}, r"apply to router='topk' only"),
        # a truthy value that is no bool would switch the option on
        ({"normalize_gates": 3}, r"normalize_gates must be true, false or none, got 3"),
        ({"normalize_gates": "false"}, r"normalize_gates must be true, false or none, got 'false'"),
        ({"noisy_gating": "false"}, r"noisy_gating must be true or false, got 'false'"),
        ({"batch_priority": 1}, r"batch_priority must be true or false, got 1"),
        ({"min_capacity": True}, r"min_capacity must be an integer >= 0, got True"),
        ({"init_scale": float("inf")}, r"init_scale must be finite and > 0, got inf"),
        ({"init_scale": True}, r"init_scale must be > 0, got True"),
        ({"second_expert_threshold": float("inf")}, r"second_expert_threshold must be finite and > 0, got inf"),
        ({"second_expert_threshold": "0.2"}, r"second_expert_threshold must be > 0, got '0.2'"),
        ({"bias_update_rate": float("inf")}, r"bias_update_rate must be a finite number >= 0, got inf"),
        ({"num_experts": 2**63}, r"num_experts must be a positive integer below 2\*\*63"),
    ],
)
def test_moe_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, **kwargs})


def test_top_k_above_experts_allowed_for_expert_choice():
    # top_k is ignored by expert choice, so it is not checked against E there.
    assert MoEConfig(**BASE, top_k=8, router="expert_choice").top_k == 8


def test_causal_safety():
    assert MoEConfig(**BASE).is_causal_safe
    assert not MoEConfig(**BASE, batch_priority=True).is_causal_safe
    assert not MoEConfig(**BASE, router="expert_choice").is_causal_safe


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slots_per_expert": 0}, r"slots_per_expert must be a positive integer, got 0"),
        ({"activation": "elu"}, r"activation must be one of .* got 'elu'"),
        ({"expert_dropout": 1.5}, r"expert_dropout must be in \[0, 1\), got 1.5"),
        ({"init_scale": -1.0}, r"init_scale must be > 0, got -1.0"),
        ({"num_experts": 0}, r"num_experts must be a positive integer, got 0"),
        ({"init_scale": float("nan")}, r"init_scale must be finite and > 0, got nan"),
        ({"router_scale_init": 0.0}, r"router_scale_init must be > 0, got 0.0"),
        ({"router_scale_init": -2.0}, r"router_scale_init must be > 0, got -2.0"),
        ({"router_scale_init": float("inf")}, r"router_scale_init must be finite and > 0, got inf"),
        ({"router_scale_init": True}, r"router_scale_init must be > 0, got True"),
        ({"router_scale_init": "8"}, r"router_scale_init must be > 0, got '8'"),
    ],
)
def test_soft_moe_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftMoEConfig(**{**BASE, **kwargs})


def test_soft_moe_router_scale_init_reaches_the_router():
    # Default 1.0 (the reference implementation's); an int is stored as a float; the layer's router starts there.
    assert SoftMoEConfig(**BASE).router_scale_init == 1.0
    c = SoftMoEConfig(**BASE, router_scale_init=8)
    assert c.router_scale_init == 8.0 and isinstance(c.router_scale_init, float)
    layer = SoftMoE(c)
    assert layer.router.scale.item() == 8.0 and layer.router.scale_init == 8.0


def test_layer_builds_from_config_fields():
    layer = MoE(MoEConfig(**BASE, top_k=2, activation="swiglu", capacity_factor=1.25, expert_dropout=0.1))
    assert layer.router.weight.shape == (4, 8)
    assert layer.experts.w_in.shape == (4, 8, 16) and layer.experts.w_out.shape == (4, 16, 8)
    assert layer.experts.w_gate.shape == (4, 8, 16)
    assert layer.router.top_k == 2 and layer.router.normalize_gates is True
    assert layer.experts.dropout == 0.1
    assert MoE(MoEConfig(**BASE)).experts.w_gate is None
