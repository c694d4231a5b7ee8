"""Sort-based local dispatch: capacity, the drop priority rule, permute and combine (docs/ALGORITHMS.md 1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.dispatch import (
    LocalDispatcher,
    combine,
    permute,
    plan_routing,
    plan_token_choice,
    token_choice_capacity,
)
from moekit.routing import RoutingDecision


@pytest.mark.parametrize(
    ("T", "E", "k", "cf", "min_cap", "expected"),
    [
        (16, 4, 1, 1.0, 0, 4),  # ceil(1.0 * 1 * 16 / 4) = 4: exactly enough for perfect balance
        (16, 4, 2, 1.0, 0, 8),  # ceil(1.0 * 2 * 16 / 4) = 8
        (16, 4, 1, 1.25, 0, 5),  # ceil(1.25 * 16 / 4) = ceil(5.0) = 5
        (10, 4, 1, 1.0, 0, 3),  # ceil(2.5) = 3
        (16, 4, 1, 0.5, 0, 2),  # ceil(2.0) = 2
        (16, 4, 1, 0.5, 4, 4),  # max(min_capacity=4, 2) = 4
        (3, 8, 2, 1.0, 4, 3),  # max(4, ceil(0.75) = 1) = 4, capped at T = 3
        (16, 2, 2, 4.0, 0, 16),  # ceil(64) = 64, capped at T = 16
        (16, 4, 1, None, 4, None),  # dropless
    ],
)
def test_capacity_golden(T, E, k, cf, min_cap, expected):
    assert token_choice_capacity(T, E, k, cf, min_cap) == expected


def test_plan_hand_example_priority_rule():
    # 4 tokens, 2 experts, k = 2, C = 2. Choices (1st, 2nd): t0 (0, 1), t1 (0, 1), t2 (1, 0), t3 (0, 1).
    # Rank 0 in group order: t0 -> e0 (slot 0), t1 -> e0 (slot 1), t2 -> e1 (slot 0), t3 -> e0 (full: drop).
    # Rank 1: t0 -> e1 (slot 1), t1 -> e1 (full), t2 -> e0 (full), t3 -> e1 (full).
    # Kept, in expert order: e0: t0 (a=0), t1 (a=2); e1: t2 (a=4), t0 (a=1). 4 of 8 assignments dropped.
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    plan = plan_token_choice(ids, 2, 2)
    assert plan.token_idx_A.tolist() == [0, 1, 2, 0]
    assert plan.assign_idx_A.tolist() == [0, 2, 4, 1]
    assert plan.tokens_per_expert_E.tolist() == [2, 2]
    assert (plan.num_assignments, plan.num_dropped, plan.capacity) == (8, 4, 2)
    assert plan.drop_fraction == 0.5


def test_plan_dropless_keeps_all_in_expert_then_group_order():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    plan = plan_token_choice(ids, 3, None)
    # e0: first choices t0, t1, t3 then second choice t2; e1: first choice t2 then second choices t0, t1, t3.
    assert plan.token_idx_A.tolist() == [0, 1, 3, 2, 2, 0, 1, 3]
    assert plan.tokens_per_expert_E.tolist() == [4, 4, 0]
    assert plan.num_dropped == 0 and plan.drop_fraction == 0.0


def test_plan_per_group_capacity():
    # Two groups of 3 tokens, all to expert 0, C = 2: each group keeps its first two tokens.
    ids = torch.zeros(6, 1, dtype=torch.long)
    plan = plan_token_choice(ids, 2, 2, num_groups=2)
    assert sorted(plan.token_idx_A.tolist()) == [0, 1, 3, 4]
    assert plan.tokens_per_expert_E.tolist() == [4, 0]
    assert plan.num_dropped == 2


def test_plan_priority_order():
    # All 4 tokens to expert 0, C = 2, priority [3, 1, 0, 2]: tokens 3 and 1 win the slots.
    ids = torch.zeros(4, 1, dtype=torch.long)
    plan = plan_token_choice(ids, 1, 2, priority_S=torch.tensor([3, 1, 0, 2]))
    assert plan.token_idx_A.tolist() == [3, 1]


def test_plan_invalid_choices_take_no_slot():
    # t0's 2nd choice (e0) is declined by the router: it takes no slot, so t1's 2nd choice to e0 fits (C = 2).
    ids = torch.tensor([[1, 0], [1, 0], [0, 1]])
    valid = torch.tensor([[True, False], [True, True], [True, True]])
    plan = plan_token_choice(ids, 2, 2, valid_SK=valid)
    assert plan.num_assignments == 5
    # e0: t2 (rank 0), t1 (rank 1); e1: t0, t1 (rank 0); t2's 2nd choice to e1 dropped.
    assert plan.token_idx_A.tolist() == [2, 1, 0, 1]
    assert plan.num_dropped == 1
    dropless = plan_token_choice(ids, 2, None, valid_SK=valid)
    assert dropless.num_assignments == 5 and dropless.num_dropped == 0
    assert dropless.tokens_per_expert_E.tolist() == [2, 3]


def test_plan_rejects_uneven_groups():
    with pytest.raises(ValueError, match="5 tokens cannot be split into 2 equal routing groups"):
        plan_token_choice(torch.zeros(5, 1, dtype=torch.long), 2, None, num_groups=2)


def test_permute_and_combine_values():
    # x = [[1], [2], [3], [4]]; plan of the hand example: rows t0, t1, t2, t0 in expert order.
    ids = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    gates = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]])
    plan = plan_token_choice(ids, 2, 2)
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    x_A = permute(x, plan)
    assert x_A.flatten().tolist() == [1.0, 2.0, 3.0, 1.0]
    y_A = 10 * x_A  # pretend every expert multiplies by 10
    out = combine(y_A, plan, gates, 4)
    # t0: 0.6 * 10 + 0.4 * 10 = 10 (both kept); t1: 0.7 * 20 = 14 (2nd dropped, not renormalised);
    # t2: 0.9 * 30 = 27; t3: nothing kept = 0.
    torch.testing.assert_close(out.flatten(), torch.tensor([10.0, 14.0, 27.0, 0.0]))


def test_local_dispatcher_round_trip():
    ids = torch.tensor([[2], [0], [2], [1]])
    gates = torch.ones(4, 1)
    dec = RoutingDecision(ids, gates, torch.zeros(4, 3), torch.zeros(4, 3))
    x = torch.randn(4, 5)
    d = LocalDispatcher(3)
    rows = d.dispatch(x, plan_routing(dec, 3))
    assert rows.tokens_per_expert_E.tolist() == [1, 1, 2]
    torch.testing.assert_close(rows.x_AD, x[[1, 3, 0, 2]])
    torch.testing.assert_close(d.combine(rows.x_AD, rows), x)


def _naive_plan(ids, E, C, G, valid, priority):
    """Kept (token, rank) pairs by the literal priority rule."""
    S, K = len(ids), len(ids[0])
    T = S // G
    order = priority if priority is not None else list(range(S))
    used = {}
    kept = set()
    for r in range(K):
        for t in order:
            if valid is not None and not valid[t][r]:
                continue
            key = (ids[t][r], t // T)
            if C is None or used.get(key, 0) < C:
                used[key] = used.get(key, 0) + 1
                kept.add((t, r))
    return kept


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_plan_properties(data):
    E = data.draw(st.integers(1, 5), label="E")
    K = data.draw(st.integers(1, min(E, 3)), label="K")
    G = data.draw(st.integers(1, 3), label="G")
    T = data.draw(st.integers(1, 6), label="T")
    S = G * T
    C = data.draw(st.one_of(st.none(), st.integers(1, T)), label="C")
    rows = [data.draw(st.permutations(range(E)), label=f"perm{s}")[:K] for s in range(S)]
    ids = torch.tensor(rows, dtype=torch.long).view(S, K)
    valid = None
    if K > 1 and data.draw(st.booleans(), label="use_valid"):
        valid = [[True] + [data.draw(st.booleans()) for _ in range(K - 1)] for _ in range(S)]
    priority = None
    if data.draw(st.booleans(), label="use_priority"):
        priority = data.draw(st.permutations(range(S)), label="priority")

    plan = plan_token_choice(
        ids,
        E,
        C,
        num_groups=G,
        valid_SK=torch.tensor(valid) if valid is not None else None,
        priority_S=torch.tensor(priority, dtype=torch.long) if priority is not None else None,
    )
    tok = plan.token_idx_A.tolist()
    rank = [a - t * K for a, t in zip(plan.assign_idx_A.tolist(), tok, strict=True)]
    kept = set(zip(tok, rank, strict=True))
    assert len(kept) == len(tok)  # no assignment kept twice

    # Exactly the assignments the literal rule keeps.
    assert kept == _naive_plan(ids.tolist(), E, C, G, valid, priority)
    # Rows are in expert order, and tokens_per_expert counts them; it sums to the kept count.
    experts = [int(ids[t, r]) for t, r in zip(tok, rank, strict=True)]
    assert experts == sorted(experts)
    assert plan.tokens_per_expert_E.tolist() == [experts.count(e) for e in range(E)]
    assert int(plan.tokens_per_expert_E.sum()) == len(tok) == plan.num_assignments - plan.num_dropped
    n_valid = S * K if valid is None else sum(map(sum, valid))
    assert plan.num_assignments == n_valid
    # At most C per expert per group.
    if C is not None:
        for e in range(E):
            for g in range(G):
                assert sum(1 for t, ex in zip(tok, experts, strict=True) if ex == e and t // T == g) <= C
    else:
        assert plan.num_dropped == 0
    # Never a later choice kept while an earlier-rank choice to the same expert in the same group is dropped.
    for t in range(S):
        for r in range(K):
            if (t, r) in kept or (valid is not None and not valid[t][r]):
                continue
            e, g = int(ids[t, r]), t // T
            for t2, r2 in kept:
                assert not (int(ids[t2, r2]) == e and t2 // T == g and r2 > r)
