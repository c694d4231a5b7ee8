"""Expert-parallel routed layers on 2 and 4 gloo ranks equal the single-process layer: outputs, drops, gradients,
for token choice, expert choice and Soft MoE.

Each rank's tokens form its own routing groups, so the reference is the single-process layer on all ranks' tokens
with the same groups: ``group_size`` = tokens per rank (or a divisor of it) for the MoE layer, one row of the batch
per group for Soft MoE (the same capacity, drop and pick decisions, docs/ALGORITHMS.md sections 1, 3 and 4).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig, SoftMoE, SoftMoEConfig
from moekit.dispatch.all_to_all import local_expert_range
from moekit.layers.expert_parallel import shard_experts_, unshard_experts_
from tests.distributed._launch import spawn

S_LOCAL, D, F = 12, 8, 16
CASES = [  # (E, top_k, capacity_factor, activation, skewed): dropless, dropping top-1, dropping top-2 gated, and
    # almost every token to expert 0 (ranks whose experts receive no rows still take part in every exchange)
    (4, 1, None, "gelu", False),
    (4, 1, 0.5, "gelu", False),
    (8, 2, 0.75, "swiglu", False),
    (4, 1, 0.5, "relu", True),
]


def _layer(E: int, k: int, cf: float | None, act: str, group_size: int | None, skewed: bool) -> MoE:
    torch.manual_seed(1)
    cfg = MoEConfig(
        d_model=D, d_ff=F, num_experts=E, top_k=k, capacity_factor=cf, min_capacity=0, activation=act,
        group_size=group_size,
    )
    layer = MoE(cfg)
    with torch.no_grad():  # O(1) weights: uneven routing, so drops and empty experts really happen
        layer.router.weight.copy_(torch.randn(E, D))
        if skewed:  # inputs are shifted positive below: expert 0's logit dominates
            layer.router.weight[0].fill_(5.0)
        for p in layer.experts.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _check(rank: int, world: int) -> None:
    for E, k, cf, act, skewed in CASES:
        ref = _layer(E, k, cf, act, S_LOCAL, skewed)
        torch.manual_seed(2)
        x_full = torch.randn(world * S_LOCAL, D) + (3.0 if skewed else 0.0)
        w_full = torch.randn(world * S_LOCAL, D)  # a fixed random cotangent
        x_ref = x_full.clone().requires_grad_(True)
        y_ref, aux_ref = ref(x_ref)
        ((y_ref * w_full).sum() + aux_ref.load_balancing_loss * world).backward()

        ep = copy.deepcopy(ref)
        ep.config.group_size = None
        ep.zero_grad(set_to_none=True)
        assert shard_experts_(ep) == 1
        rows = slice(rank * S_LOCAL, (rank + 1) * S_LOCAL)
        x = x_full[rows].clone().requires_grad_(True)
        y, aux = ep(x)
        ((y * w_full[rows]).sum() + aux.load_balancing_loss).backward()

        torch.testing.assert_close(y, y_ref[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, x_ref.grad[rows], rtol=1e-5, atol=1e-6)
        # Router: replicated, each rank holds the gradient of its own tokens' terms; their sum is the full one.
        g = ep.router.weight.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, ref.router.weight.grad, rtol=1e-5, atol=1e-6)
        first, stop = local_expert_range(E, world, rank)
        for name, p in ep.experts.named_parameters():
            p_ref = dict(ref.experts.named_parameters())[name]
            assert p.shape[0] == E // world
            # A rank whose experts received no rows has no gradient at all: zero, as in the full bank.
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grad, p_ref.grad[first:stop], rtol=1e-5, atol=1e-6)
        # Drop fractions are per rank's routing group.
        n_drop = torch.tensor([aux.drop_fraction.item()])
        dist.all_reduce(n_drop)
        assert abs(n_drop.item() / world - aux_ref.drop_fraction.item()) < 1e-6
        # Back to one process: every expert on every rank again, equal to the reference weights.
        unshard_experts_(ep)
        for name, p in ep.experts.named_parameters():
            torch.testing.assert_close(p.data, dict(ref.experts.named_parameters())[name].data)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_layer_matches_single_process(world):
    spawn(_check, world)


def _compare_sharded(rank: int, world: int, ref, ep, x_full: torch.Tensor, split_dim: int) -> None:
    """Run ``ref`` on all ranks' inputs and the sharded ``ep`` on this rank's share (dimension ``split_dim``);
    outputs, input gradients, summed router gradients, this rank's expert gradients and the global loads agree."""
    torch.manual_seed(3)
    w_full = torch.randn(x_full.shape[:-1] + (D,))  # a fixed random cotangent
    x_ref = x_full.clone().requires_grad_(True)
    y_ref, aux_ref = ref(x_ref)
    ((y_ref * w_full).sum() + aux_ref.z_loss * world).backward()
    E = ref.num_experts
    assert shard_experts_(ep) == 1
    n = x_full.shape[split_dim] // world
    x = x_full.narrow(split_dim, rank * n, n).clone().requires_grad_(True)
    y, aux = ep(x)
    ((y * w_full.narrow(split_dim, rank * n, n)).sum() + aux.z_loss).backward()
    torch.testing.assert_close(y, y_ref.narrow(split_dim, rank * n, n), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad.narrow(split_dim, rank * n, n), rtol=1e-5, atol=1e-6)
    for name, p in ep.router.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, dict(ref.router.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)
    first, stop = local_expert_range(E, world, rank)
    for name, p in ep.experts.named_parameters():
        assert p.shape[0] == E // world
        torch.testing.assert_close(p.grad, dict(ref.experts.named_parameters())[name].grad[first:stop],
                                   rtol=1e-5, atol=1e-6)
    # Loads over all E experts, summed over the ranks, are the single process's.
    loads = aux.tokens_per_expert.clone()
    dist.all_reduce(loads)
    assert loads.tolist() == aux_ref.tokens_per_expert.tolist()
    unshard_experts_(ep)
    for name, p in ep.experts.named_parameters():
        torch.testing.assert_close(p.data, dict(ref.experts.named_parameters())[name].data)


def _check_expert_choice(rank: int, world: int) -> None:
    for E, cf, act, group_size in [(4, 1.0, "gelu", S_LOCAL), (8, 2.0, "swiglu", S_LOCAL // 2)]:
        torch.manual_seed(1)
        ref = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, router="expert_choice", capacity_factor=cf,
                            activation=act, group_size=group_size))
        with torch.no_grad():  # O(1) router weights: picks overlap, some tokens get several experts and some none
            ref.router.weight.copy_(torch.randn(E, D))
        torch.manual_seed(2)
        x_full = torch.randn(world * S_LOCAL, D)
        _compare_sharded(rank, world, ref, copy.deepcopy(ref), x_full, split_dim=0)


def _check_soft(rank: int, world: int) -> None:
    for E, P, act in [(4, 1, "gelu"), (8, 2, "swiglu")]:
        torch.manual_seed(1)
        ref = SoftMoE(SoftMoEConfig(d_model=D, d_ff=F, num_experts=E, slots_per_expert=P, activation=act))
        torch.manual_seed(2)
        x_full = torch.randn(world * 3, 5, D)  # 3 groups (rows) of 5 tokens per rank
        _compare_sharded(rank, world, ref, copy.deepcopy(ref), x_full, split_dim=0)


def _check_deepseek_style(rank: int, world: int) -> None:
    # Sigmoid scores, a choice bias, 4 expert groups of which 2 are eligible, scaled gates, gated shared experts:
    # each rank routes its own tokens over all experts (the bias is replicated), the shared experts run locally.
    torch.manual_seed(1)
    ref = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=8, top_k=2, capacity_factor=None, activation="swiglu",
                        score_func="sigmoid", expert_bias=True, num_expert_groups=4, topk_groups=2,
                        routed_scaling_factor=2.5, num_shared_experts=1, shared_expert_gate=True))
    with torch.no_grad():
        ref.router.weight.copy_(torch.randn(8, D))
        ref.router.expert_bias.copy_(torch.randn(8) * 0.3)
    torch.manual_seed(2)
    _compare_sharded(rank, world, ref, copy.deepcopy(ref), torch.randn(world * S_LOCAL, D), split_dim=0)


def _check_expert_choice_and_soft(rank: int, world: int) -> None:
    _check_expert_choice(rank, world)
    _check_soft(rank, world)
    _check_deepseek_style(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_expert_choice_and_soft_moe_match_single_process(world):
    spawn(_check_expert_choice_and_soft, world)


def _bad_split(rank: int, world: int) -> None:
    layer = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=3, top_k=1))
    with pytest.raises(ValueError, match="divisible"):
        shard_experts_(layer)


def test_experts_not_divisible_is_an_error():
    # The rule itself, in this process: 3 experts cannot split over 2 ranks; 8 split as 4 + 4.
    with pytest.raises(ValueError, match="divisible"):
        local_expert_range(3, 2, 0)
    assert local_expert_range(8, 2, 1) == (4, 8)
    # And the real conversion on a 2-rank gloo group refuses it (each rank asserts the ValueError).
    spawn(_bad_split, 2)
