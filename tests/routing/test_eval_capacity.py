"""``eval_capacity_factor``: Switch's evaluation capacity (trained at 1.0-1.25, evaluated at 2.0)."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.errors import ConfigError


def test_capacity_follows_the_mode():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=1, capacity_factor=1.0,
                          eval_capacity_factor=2.0, min_capacity=1))
    x = torch.randn(64, 16)
    # C = max(1, ceil(CF * k * T / E)): training ceil(1.0 * 64 / 4) = 16; eval ceil(2.0 * 64 / 4) = 32
    layer.train()
    assert layer.router(x.view(1, 64, 16)).capacity == 16
    layer.eval()
    assert layer.router(x.view(1, 64, 16)).capacity == 32
    with torch.no_grad():
        _, aux_eval = layer(x)
        layer.train()
        _, aux_train = layer(x)
    assert aux_eval.drop_fraction <= aux_train.drop_fraction


def test_default_is_the_training_factor():
    layer = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=1)).eval()
    # ceil(1.25 * 2 * 40 / 4) = 25 in both modes
    assert layer.router(torch.randn(1, 40, 16)).capacity == 25


@pytest.mark.parametrize("kw, message", [
    ({"eval_capacity_factor": 0.0}, "eval_capacity_factor must be a finite number > 0"),
    ({"eval_capacity_factor": 2.0, "capacity_factor": None}, "applies to router='topk' with a capacity_factor"),
])
def test_bad_values(kw, message):
    with pytest.raises(ConfigError, match=message):
        MoEConfig(d_model=16, d_ff=8, num_experts=4, **kw)
