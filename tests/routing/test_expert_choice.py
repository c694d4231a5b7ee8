"""ExpertChoiceRouter: each expert picks its ceil(S * c / E) most probable tokens (docs/ALGORITHMS.md 3)."""

from __future__ import annotations

import pytest
import torch

from moekit.routing import ExpertChoiceRouter, expert_choice_capacity


@pytest.mark.parametrize(
    ("S", "E", "c", "expected"),
    [
        (16, 4, 1.0, 4),  # ceil(16 * 1 / 4) = 4
        (10, 4, 1.0, 3),  # ceil(10 / 4) = ceil(2.5) = 3
        (10, 4, 2.0, 5),  # ceil(20 / 4) = 5
        (3, 8, 1.0, 1),  # ceil(3 / 8) = 1 (fewer tokens than experts)
        (6, 2, 5.0, 6),  # ceil(30 / 2) = 15, capped at S = 6
        (8, 4, 0.01, 1),  # ceil(0.02) = 1, never 0
    ],
)
def test_capacity_golden(S, E, c, expected):
    assert expert_choice_capacity(S, E, c) == expected


def test_each_expert_takes_its_top_tokens():
    r = ExpertChoiceRouter(4, 3, capacity_factor=1.0)
    with torch.no_grad():
        r.weight.copy_(torch.randn(3, 4))
    x = torch.randn(9, 4)
    dec = r(x)
    probs = torch.softmax(x @ r.weight.detach().t(), dim=-1)
    torch.testing.assert_close(dec.probs_SE, probs)
    assert dec.token_ids_GEC.shape == (1, 3, 3)  # ceil(9 / 3) = 3
    for e in range(3):
        naive = sorted(range(9), key=lambda t, e=e: -float(probs[t, e]))[:3]
        assert dec.token_ids_GEC[0, e].tolist() == naive
        torch.testing.assert_close(dec.gates_GEC[0, e], probs[naive, e])


def test_groups_are_routed_independently():
    r = ExpertChoiceRouter(4, 2, capacity_factor=1.0)
    x = torch.randn(3, 6, 4)
    dec = r(x)
    assert dec.token_ids_GEC.shape == (3, 2, 3)
    for g in range(3):
        one = r(x[g])
        assert torch.equal(dec.token_ids_GEC[g], one.token_ids_GEC[0])  # ids are within the group
        torch.testing.assert_close(dec.gates_GEC[g], one.gates_GEC[0])


def test_float32_under_autocast():
    r = ExpertChoiceRouter(8, 4)
    x = torch.randn(12, 8)
    ref = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec = r(x)
    assert dec.logits_SE.dtype == torch.float32 and dec.gates_GEC.dtype == torch.float32
    assert torch.equal(dec.logits_SE, ref.logits_SE)


@pytest.mark.parametrize("c", [0.0, -1.0, None])
def test_rejects_non_positive_capacity_factor(c):
    with pytest.raises(ValueError, match=rf"capacity_factor must be > 0 for expert choice, got {c}"):
        ExpertChoiceRouter(4, 2, capacity_factor=c)
