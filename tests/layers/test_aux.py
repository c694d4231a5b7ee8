"""MoEAux.mean_gate: the mean combine weight over the assignments a layer processed, checked on hand-made routings."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE, MoEConfig, SoftMoE, SoftMoEConfig


def _two_expert_layer(top_k: int, capacity_factor: float | None) -> MoE:
    # Router weight = identity (E = 2, D = 2): the logits are the inputs themselves.
    layer = MoE(
        MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=top_k, capacity_factor=capacity_factor, min_capacity=0)
    )
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    return layer.eval()


# Three tokens whose softmax over the two experts is known exactly:
#   t0 logits (ln 3, 0) -> probs (3/4, 1/4): expert 0, gate 3/4
#   t1 logits (ln 2, 0) -> probs (2/3, 1/3): expert 0, gate 2/3
#   t2 logits (0, ln 3) -> probs (1/4, 3/4): expert 1, gate 3/4
X = torch.tensor([[math.log(3), 0.0], [math.log(2), 0.0], [0.0, math.log(3)]])


def test_top1_dropless_mean_gate_is_the_mean_top1_probability():
    _, aux = _two_expert_layer(1, None)(X)
    # (3/4 + 2/3 + 3/4) / 3 = (9 + 8 + 9) / 36 = 26 / 36 = 13 / 18 = 0.7222...
    assert aux.metrics()["mean_gate"] == pytest.approx(13 / 18)
    assert aux.mean_gate.dtype == torch.float32 and not aux.mean_gate.requires_grad


def test_top1_dropped_assignments_do_not_count():
    # CF 0.5: C = ceil(0.5 * 1 * 3 / 2) = 1 slot per expert. t0 takes expert 0's slot (group order), t1 is dropped,
    # t2 takes expert 1's: the mean over the kept ones is (3/4 + 3/4) / 2 = 3/4.
    _, aux = _two_expert_layer(1, 0.5)(X)
    assert aux.metrics()["drop_fraction"] == pytest.approx(1 / 3)
    assert aux.metrics()["mean_gate"] == pytest.approx(0.75)


def test_top2_normalised_gates_average_one_half():
    # Top-2 of 2 experts with renormalised gates (the default for k > 1): each token's two gates sum to 1, so the
    # mean over its 6 kept assignments is 3 / 6 = 1/2.
    _, aux = _two_expert_layer(2, None)(X)
    assert aux.metrics()["mean_gate"] == pytest.approx(0.5)


def test_expert_choice_mean_gate_is_the_mean_of_the_picks():
    layer = MoE(MoEConfig(d_model=2, d_ff=4, num_experts=2, router="expert_choice", capacity_factor=1.0))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    _, aux = layer.eval()(X)
    # Each expert takes C = ceil(1.0 * 3 / 2) = 2 tokens, its best two by probability: expert 0 takes t0 (3/4) and
    # t1 (2/3), expert 1 takes t2 (3/4) and t1 (1/3). Mean: (3/4 + 2/3 + 3/4 + 1/3) / 4 = 2.5 / 4 = 0.625.
    assert aux.metrics()["mean_gate"] == pytest.approx(0.625)


def test_soft_moe_has_no_mean_gate():
    layer = SoftMoE(SoftMoEConfig(d_model=4, d_ff=8, num_experts=2, slots_per_expert=1))
    _, aux = layer(torch.randn(1, 3, 4))
    assert aux.mean_gate is None and "mean_gate" not in aux.metrics()
