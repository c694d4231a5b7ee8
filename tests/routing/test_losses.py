"""Golden values for the router losses (docs/ALGORITHMS.md section 2), computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.routing import load_balancing_loss, router_z_loss

# 4 tokens, 2 experts, top-1. argmax picks experts [0, 0, 1, 0].
PROBS = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
IDS = torch.tensor([[0], [0], [1], [0]])


def test_load_balancing_golden_top1():
    # f = counts / (S*k) = [3/4, 1/4]
    # P = column means = [(0.8+0.6+0.3+0.9)/4, (0.2+0.4+0.7+0.1)/4] = [0.65, 0.35]
    # L = E * sum f*P = 2 * (0.75*0.65 + 0.25*0.35) = 2 * (0.4875 + 0.0875) = 2 * 0.575 = 1.15
    loss = load_balancing_loss(PROBS, IDS, 2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.15, abs=1e-6)


def test_load_balancing_golden_top2_three_experts():
    # 2 tokens, 3 experts, k = 2. Choices: token 0 -> {0, 1}, token 1 -> {1, 2}.
    # f = [1, 2, 1] / (S*k = 4) = [0.25, 0.5, 0.25]
    # P = [(0.5+0.1)/2, (0.3+0.6)/2, (0.2+0.3)/2] = [0.3, 0.45, 0.25]
    # L = 3 * (0.25*0.3 + 0.5*0.45 + 0.25*0.25) = 3 * (0.075 + 0.225 + 0.0625) = 3 * 0.3625 = 1.0875
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ids = torch.tensor([[0, 1], [1, 2]])
    assert load_balancing_loss(probs, ids, 3).item() == pytest.approx(1.0875, abs=1e-6)


def test_load_balancing_gradient_flows_through_mean_probs_only():
    # dL/dp[s, i] = E * f_i / S: expert 0 -> 2 * 0.75 / 4 = 0.375, expert 1 -> 2 * 0.25 / 4 = 0.125.
    probs = PROBS.clone().requires_grad_(True)
    load_balancing_loss(probs, IDS, 2).backward()
    expected = torch.tensor([[0.375, 0.125]]).expand(4, 2)
    torch.testing.assert_close(probs.grad, expected, rtol=0, atol=1e-7)


def test_load_balancing_grouped_is_mean_of_groups():
    # Group A = tokens 0,1: ids [0, 0] -> f = [1, 0]; P = [0.7, 0.3]; L_A = 2 * 0.7 = 1.4
    # Group B = tokens 2,3: ids [1, 0] -> f = [0.5, 0.5]; P = [0.6, 0.4]; L_B = 2 * (0.3 + 0.2) = 1.0
    # mean = 1.2 (differs from the ungrouped 1.15: the groups are balanced separately)
    grouped = load_balancing_loss(PROBS, IDS, 2, num_groups=2)
    assert grouped.item() == pytest.approx(1.2, abs=1e-6)
    per_group = [load_balancing_loss(PROBS[i : i + 2], IDS[i : i + 2], 2) for i in (0, 2)]
    assert grouped.item() == pytest.approx(sum(p.item() for p in per_group) / 2, abs=1e-7)


def test_load_balancing_grouped_random_equals_mean_of_per_group():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(24, 5, generator=g), dim=-1)
    ids = torch.topk(probs, 2, dim=-1).indices
    grouped = load_balancing_loss(probs, ids, 5, num_groups=4)
    parts = torch.stack([load_balancing_loss(probs[i : i + 6], ids[i : i + 6], 5) for i in range(0, 24, 6)])
    torch.testing.assert_close(grouped, parts.mean(), rtol=1e-6, atol=1e-7)


def test_load_balancing_perfect_balance_is_exactly_one():
    # Uniform p = 1/4 and each expert chosen by 1/4 of the assignments: L = 4 * 4 * (1/4 * 1/4) = 1.
    # All quantities are dyadic, so float32 gives exactly 1.0.
    probs = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3], [2, 0], [3, 1]])
    assert load_balancing_loss(probs, ids, 4).item() == 1.0
    # Balanced counts make L = sum_i P_i = 1 for ANY probabilities (up to rounding).
    probs = torch.softmax(torch.randn(8, 4), dim=-1)
    assert load_balancing_loss(probs, ids, 4).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_all_to_one_expert_is_E_times_its_mean_prob():
    # f = [1, 0, 0]: L = 3 * P_0 = 3 * mean([0.9, 0.5]) = 3 * 0.7 = 2.1
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.25, 0.25]])
    ids = torch.tensor([[0], [0]])
    assert load_balancing_loss(probs, ids, 3).item() == pytest.approx(2.1, abs=1e-6)


def test_load_balancing_low_precision_input_computed_in_float32():
    loss = load_balancing_loss(PROBS.to(torch.bfloat16), IDS, 2)
    assert loss.dtype == torch.float32
    # bf16(0.8, 0.6, 0.3, 0.9) column mean differs from 0.65 by < 4e-3; L within 2 * 0.75 * 4e-3 + ...
    assert loss.item() == pytest.approx(1.15, abs=1e-2)


@pytest.mark.parametrize(
    ("probs", "ids", "E", "groups", "match"),
    [
        (torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), 2, 1, r"probs_SE must have shape \[S, 2\]"),
        (torch.rand(4, 2), torch.zeros(3, 1, dtype=torch.long), 2, 1, r"expert_ids_SK must have shape \[S=4"),
        (torch.rand(4, 2), torch.zeros(4, 1, dtype=torch.long), 2, 3, r"4 tokens cannot be split into 3"),
    ],
)
def test_load_balancing_rejects_bad_shapes(probs, ids, E, groups, match):
    with pytest.raises(ValueError, match=match):
        load_balancing_loss(probs, ids, E, num_groups=groups)


def test_z_loss_golden():
    # Row 0: logits [0, ln 3] -> logsumexp = ln(1 + 3) = ln 4 = 2 ln 2
    # Row 1: logits [ln 2, ln 2] -> logsumexp = ln(2 + 2) = ln 4 = 2 ln 2
    # Row 2: logits [0, 0] -> logsumexp = ln 2
    # L_Z = mean(lse^2) = (4 (ln2)^2 + 4 (ln2)^2 + (ln2)^2) / 3 = 3 (ln 2)^2 = 1.4413593...
    ln2, ln3 = math.log(2), math.log(3)
    logits = torch.tensor([[0.0, ln3], [ln2, ln2], [0.0, 0.0]])
    loss = router_z_loss(logits)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(3 * ln2**2, rel=1e-6)
    assert loss.item() == pytest.approx(1.4413593, rel=1e-6)


def test_z_loss_single_token_is_ln4_squared():
    # logsumexp([0, ln 3]) = ln 4; (ln 4)^2 = 1.9218120...
    loss = router_z_loss(torch.tensor([[0.0, math.log(3)]]))
    assert loss.item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert loss.item() == pytest.approx(1.9218120, rel=1e-6)


def test_z_loss_gradient():
    # d/dlogits of mean(lse^2) = 2 * lse * softmax(logits) / S. Row 0 of the golden case, S = 3:
    # 2 * ln4 * [1/4, 3/4] / 3 = ln4 * [1/6, 1/2]
    ln2, ln3 = math.log(2), math.log(3)
    logits = torch.tensor([[0.0, ln3], [ln2, ln2], [0.0, 0.0]], requires_grad=True)
    router_z_loss(logits).backward()
    ln4 = math.log(4)
    expected = torch.tensor(
        [[ln4 / 6, ln4 / 2], [2 * ln4 * 0.5 / 3, 2 * ln4 * 0.5 / 3], [2 * ln2 * 0.5 / 3, 2 * ln2 * 0.5 / 3]]
    )
    torch.testing.assert_close(logits.grad, expected, rtol=1e-6, atol=1e-7)


def test_z_loss_large_logits_stay_finite_in_float32():
    # bf16 logits of 1000 would overflow exp(); the loss is logsumexp in float32: lse = 1000 + ln 2.
    logits = torch.tensor([[1000.0, 1000.0]], dtype=torch.bfloat16)
    loss = router_z_loss(logits)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((1000 + math.log(2)) ** 2, rel=1e-6)


def test_z_loss_rejects_non_2d():
    with pytest.raises(ValueError, match=r"logits_SE must have shape \[S, E\], got \(3,\)"):
        router_z_loss(torch.zeros(3))
