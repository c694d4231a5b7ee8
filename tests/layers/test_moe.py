"""The MoE layer equals a naive per-token loop (tests/_reference.py): outputs, gradients, drops, aux.

Sizes are chosen so that CF 0.5 really drops assignments: S = 32 tokens, E = 4 experts, min_capacity = 0, so
C = ceil(0.5 * k * 32 / 4) = 4 (k = 1) or 8 (k = 2), i.e. half the assignments at most fit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig
from moekit.dispatch import token_choice_capacity
from moekit.routing import load_balancing_loss, router_z_loss
from tests._reference import naive_expert_choice, naive_token_choice

S, D, F, E = 32, 8, 16, 4


def make_moe(num_experts=E, top_k=1, capacity_factor=None, *, router_scale=1.0, min_capacity=0, **kw) -> MoE:
    layer = MoE(
        MoEConfig(
            d_model=D,
            d_ff=F,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            min_capacity=min_capacity,
            **kw,
        )
    )
    with torch.no_grad():  # O(1) weights: routing is uneven and the experts' nonlinearity matters
        layer.router.weight.copy_(torch.randn(num_experts, D) * router_scale)
        for p in layer.experts.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def _params(layer):
    ps = [layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    return ps + ([layer.experts.w_gate] if layer.experts.w_gate is not None else [])


def _grads(y, x, layer, g):
    return torch.autograd.grad((y * g).sum(), [x, *_params(layer)])


def _compare(layer, x, y, y_ref, *, rtol=1e-5, atol=1e-5):
    g = torch.randn_like(y)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    for got, want in zip(_grads(y, x, layer, g), _grads(y_ref, x, layer, g), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5], ids=["dropless", "cf1.0", "cf0.5"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_token_choice_equals_naive_loop(top_k, capacity_factor):
    layer = make_moe(top_k=top_k, capacity_factor=capacity_factor)
    x = torch.randn(S, D, requires_grad=True)
    y, aux = layer(x)
    C = token_choice_capacity(S, E, top_k, capacity_factor, 0)
    y_ref, info = naive_token_choice(layer, x, top_k=top_k, capacity=C)
    _compare(layer, x, y, y_ref)

    # Drops and per-expert counts match the literal rule.
    assert aux.drop_fraction.item() == pytest.approx(info["num_dropped"] / (S * top_k), abs=1e-7)
    assert torch.equal(aux.tokens_per_expert, info["tokens_per_expert"])
    if capacity_factor == 0.5:
        assert info["num_dropped"] >= S * top_k // 2  # at most E * C = S * k / 2 assignments fit
    if capacity_factor is None:
        assert info["num_dropped"] == 0 and aux.drop_fraction.item() == 0.0
    # Aux losses are the pure functions of the decision, and the decision is the reference one.
    assert torch.equal(aux.routing.expert_ids_SK, info["ids"])
    torch.testing.assert_close(aux.load_balancing_loss, load_balancing_loss(info["probs"], info["ids"], E))
    torch.testing.assert_close(aux.z_loss, router_z_loss(info["logits"]))
    p = info["probs"]
    torch.testing.assert_close(aux.router_entropy, -(p * p.log()).sum(-1).mean())
    assert aux.max_logit.item() == pytest.approx(info["logits"].max().item())


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_choice_float64_reference_path(top_k):
    # float64 takes grouped_mm_reference; the router still computes in float32, so gates are identical and the
    # outputs agree to float64 rounding.
    layer = make_moe(top_k=top_k, capacity_factor=0.5).double()
    x = torch.randn(S, D, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    assert y.dtype == torch.float64
    y_ref, _ = naive_token_choice(layer, x, top_k=top_k, capacity=token_choice_capacity(S, E, top_k, 0.5, 0))
    _compare(layer, x, y, y_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("top_k", "capacity_factor"), [(1, 1.0), (2, 1.0), (2, 0.5), (2, None)])
def test_group_size_capacity_per_group(top_k, capacity_factor):
    group = 8
    layer = make_moe(top_k=top_k, capacity_factor=capacity_factor, group_size=group)
    x = torch.randn(S, D, requires_grad=True)
    y, aux = layer(x)
    C = token_choice_capacity(group, E, top_k, capacity_factor, 0)  # ceil(CF * k * 8 / 4) per group
    y_ref, info = naive_token_choice(layer, x, top_k=top_k, capacity=C, group_size=group)
    _compare(layer, x, y, y_ref)
    assert aux.drop_fraction.item() == pytest.approx(info["num_dropped"] / (S * top_k), abs=1e-7)
    # The balance loss is the mean over the 4 groups.
    probs, ids = info["probs"], info["ids"]
    groups = [load_balancing_loss(probs[i : i + 8], ids[i : i + 8], E) for i in range(0, S, 8)]
    torch.testing.assert_close(aux.load_balancing_loss, torch.stack(groups).mean())


def test_group_size_differs_from_one_group_when_dropping():
    # Per-group capacity keeps a different set than one capacity over all tokens (else the option is a no-op).
    layer = make_moe(top_k=1, capacity_factor=0.5, group_size=8)
    x = torch.randn(S, D)
    _, info_grouped = naive_token_choice(layer, x, top_k=1, capacity=1, group_size=8)
    _, info_one = naive_token_choice(layer, x, top_k=1, capacity=4)
    assert not torch.equal(info_grouped["kept"], info_one["kept"])
    assert torch.equal(layer(x)[1].tokens_per_expert, info_grouped["tokens_per_expert"])


@pytest.mark.parametrize("top_k", [1, 2])
def test_batch_priority_equals_naive_loop(top_k):
    layer = make_moe(top_k=top_k, capacity_factor=0.5, batch_priority=True)
    x = torch.randn(S, D, requires_grad=True)
    y, aux = layer(x)
    C = token_choice_capacity(S, E, top_k, 0.5, 0)
    y_ref, info = naive_token_choice(layer, x, top_k=top_k, capacity=C, batch_priority=True)
    _compare(layer, x, y, y_ref)
    assert aux.drop_fraction.item() == pytest.approx(info["num_dropped"] / (S * top_k), abs=1e-7)
    # And it really is a different rule from group order on this input.
    _, info_plain = naive_token_choice(layer, x, top_k=top_k, capacity=C)
    assert not torch.equal(info["kept"], info_plain["kept"])


def test_second_expert_policy_random_declined_choices_contribute_nothing():
    layer = make_moe(top_k=2, capacity_factor=None, second_expert_policy="random")
    layer.train()
    x = torch.randn(S, D, requires_grad=True)
    y, aux = layer(x)
    valid = aux.routing.valid_SK
    assert valid is not None and valid[:, 0].all() and not valid[:, 1].all()
    y_ref, info = naive_token_choice(layer, x, top_k=2, capacity=None, valid_SK=valid)
    _compare(layer, x, y, y_ref)
    assert aux.tokens_per_expert.sum().item() == int(valid.sum())
    # Eval: every 2nd choice is kept.
    layer.eval()
    assert layer(x)[1].tokens_per_expert.sum().item() == 2 * S


@pytest.mark.parametrize(
    ("capacity_factor", "group_size"), [(1.0, None), (2.0, None), (0.5, None), (1.0, 8), (1.5, 16)]
)
def test_expert_choice_equals_naive_loop(capacity_factor, group_size):
    layer = make_moe(capacity_factor=capacity_factor, router="expert_choice", group_size=group_size)
    x = torch.randn(S, D, requires_grad=True)
    y, aux = layer(x)
    y_ref, info = naive_expert_choice(layer, x, capacity_factor=capacity_factor, group_size=group_size)
    _compare(layer, x, y, y_ref)
    groups = S // (group_size or S)
    assert aux.tokens_per_expert.tolist() == [groups * info["capacity"]] * E
    assert aux.drop_fraction.item() == pytest.approx(1 - len(info["picked"]) / S, abs=1e-7)
    assert aux.load_balancing_loss.item() == 0.0
    torch.testing.assert_close(aux.z_loss, router_z_loss(x.detach() @ layer.router.weight.detach().t()))


def test_leading_dims_are_flattened():
    layer = make_moe(top_k=2, capacity_factor=1.0)
    x = torch.randn(4, 8, D)
    y, aux = layer(x)
    y_flat, aux_flat = layer(x.reshape(S, D))
    assert y.shape == (4, 8, D)
    assert torch.equal(y.reshape(S, D), y_flat)
    assert torch.equal(aux.tokens_per_expert, aux_flat.tokens_per_expert)


# ---------------------------------------------------------------- edge cases


def _dominated_input(n=S):
    x = torch.randn(n, D)
    x[:, 0] = x[:, 0].abs() + 1.0  # a positive feature a router row can key on
    return x


def test_expert_with_no_tokens():
    # Router row 3 = -20 * e_0: expert 3's logit is <= -20 while the others are O(1): never in the top 2.
    layer = make_moe(top_k=2, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -20.0
    x = _dominated_input().requires_grad_(True)
    y, aux = layer(x)
    assert aux.tokens_per_expert[3].item() == 0
    y_ref, _ = naive_token_choice(layer, x, top_k=2, capacity=token_choice_capacity(S, E, 2, 1.0, 0))
    _compare(layer, x, y, y_ref)
    y, _ = layer(x)
    y.sum().backward()  # also the expanded gradient of a plain sum
    assert torch.isfinite(x.grad).all()
    assert torch.equal(layer.experts.w_in.grad[3], torch.zeros(D, F))
    assert torch.equal(layer.experts.w_out.grad[3], torch.zeros(F, D))
    assert layer.experts.w_in.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_every_token_to_one_expert(capacity_factor):
    # Router row 0 = +20 * e_0: expert 0 wins every token.
    layer = make_moe(top_k=1, capacity_factor=capacity_factor, router_scale=0.01, min_capacity=4)
    with torch.no_grad():
        layer.router.weight[0, 0] = 20.0
    x = _dominated_input().requires_grad_(True)
    y, aux = layer(x)
    C = token_choice_capacity(S, E, 1, capacity_factor, 4)  # max(4, ceil(32 / 4)) = 8, or None
    y_ref, info = naive_token_choice(layer, x, top_k=1, capacity=C)
    _compare(layer, x, y, y_ref)
    if capacity_factor is None:
        assert aux.tokens_per_expert.tolist() == [S, 0, 0, 0]
        assert aux.drop_fraction.item() == 0.0
    else:
        # C = 8: tokens 0..7 (group order) are kept, the other 24 dropped: their output is exactly 0.
        assert aux.tokens_per_expert.tolist() == [8, 0, 0, 0]
        assert aux.drop_fraction.item() == pytest.approx(24 / 32)
        assert torch.equal(y[8:].detach(), torch.zeros(S - 8, D))
        assert (y[:8].detach().abs().sum(-1) > 0).all()
    # f = [1, 0, 0, 0] and P_0 ~ 1: L_B ~ E = 4, the worst case.
    assert aux.load_balancing_loss.item() == pytest.approx(4 * info["probs"][:, 0].mean().item(), rel=1e-6)
    assert aux.load_balancing_loss.item() > 3.9


@pytest.mark.parametrize("top_k", [1, 2])
def test_fewer_tokens_than_experts(top_k):
    n, num_experts = 3, 8
    layer = make_moe(num_experts=num_experts, top_k=top_k, capacity_factor=1.0, min_capacity=4)
    x = torch.randn(n, D, requires_grad=True)
    y, aux = layer(x)
    C = token_choice_capacity(n, num_experts, top_k, 1.0, 4)
    assert C == 3  # max(4, ceil(k * 3 / 8) = 1) = 4, capped at S = 3
    y_ref, info = naive_token_choice(layer, x, top_k=top_k, capacity=C)
    _compare(layer, x, y, y_ref)
    assert info["num_dropped"] == 0 and aux.drop_fraction.item() == 0.0
    assert int(aux.tokens_per_expert.sum()) == n * top_k
    assert (aux.tokens_per_expert == 0).sum() >= num_experts - n * top_k


def test_fewer_tokens_than_experts_expert_choice():
    # ceil(3 * 1 / 8) = 1: each of the 8 experts takes its single best token.
    layer = make_moe(num_experts=8, capacity_factor=1.0, router="expert_choice")
    x = torch.randn(3, D, requires_grad=True)
    y, aux = layer(x)
    y_ref, info = naive_expert_choice(layer, x, capacity_factor=1.0)
    assert info["capacity"] == 1
    _compare(layer, x, y, y_ref)
    assert aux.tokens_per_expert.tolist() == [1] * 8


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_router_float32_under_bf16_autocast(router):
    layer = make_moe(top_k=2, capacity_factor=1.0, router=router, num_experts=4)
    x = torch.randn(S, D)
    y32, aux32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert aux.routing.logits_SE.dtype == torch.float32
    assert aux.routing.probs_SE.dtype == torch.float32
    assert aux.z_loss.dtype == torch.float32 and aux.load_balancing_loss.dtype == torch.float32
    # The router ran with autocast off: same logits bit for bit, so the same routing.
    assert torch.equal(aux.routing.logits_SE, aux32.routing.logits_SE)
    assert torch.equal(aux.tokens_per_expert, aux32.tokens_per_expert)
    # The experts ran in bf16: close to float32, not equal.
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)
    (y.float().sum() + aux.z_loss).backward()
    assert torch.isfinite(layer.router.weight.grad).all() and torch.isfinite(layer.experts.w_in.grad).all()


def test_jitter_training_only():
    layer = make_moe(top_k=2, capacity_factor=1.0, jitter_eps=0.2)
    x = torch.randn(S, D)
    layer.eval()
    y1, a1 = layer(x)
    y2, a2 = layer(x)
    assert torch.equal(y1, y2) and torch.equal(a1.routing.logits_SE, a2.routing.logits_SE)
    torch.testing.assert_close(a1.routing.logits_SE, x @ layer.router.weight.detach().t())
    layer.train()
    assert not torch.equal(layer(x)[1].routing.logits_SE, a1.routing.logits_SE)


@pytest.mark.parametrize(
    ("x_shape", "match"),
    [((4, D + 1), r"input width must equal d_model=8, got shape \(4, 9\)"), ((0, D), "no tokens")],
)
def test_bad_input(x_shape, match):
    with pytest.raises(ValueError, match=match):
        make_moe()(torch.randn(*x_shape))


def test_group_size_must_divide_tokens():
    with pytest.raises(ValueError, match=r"number of tokens \(30\) must be a multiple of group_size=8"):
        make_moe(group_size=8)(torch.randn(30, D))


def test_moe_requires_config():
    with pytest.raises(ValueError, match="MoE expects a MoEConfig, got dict"):
        MoE({"d_model": 8})


def test_aux_loss_gradients_reach_the_router():
    layer = make_moe(top_k=2, capacity_factor=1.0)
    x = torch.randn(S, D)
    _, aux = layer(x)
    w = layer.router.weight
    g_lb, g_z = (torch.autograd.grad(loss, [w], retain_graph=True)[0] for loss in (aux.load_balancing_loss,
                                                                                 aux.z_loss))
    logits = torch.nn.functional.linear(x, w)
    probs = torch.softmax(logits, dim=-1)
    ids = torch.topk(probs, 2, dim=-1).indices
    (want_lb,) = torch.autograd.grad(load_balancing_loss(probs, ids, E), [w], retain_graph=True)
    (want_z,) = torch.autograd.grad(router_z_loss(logits), [w])
    torch.testing.assert_close(g_lb, want_lb)
    torch.testing.assert_close(g_z, want_z)
    m = aux.metrics()
    assert m["tokens_per_expert"] == aux.tokens_per_expert.tolist() and sum(m["tokens_per_expert"]) <= 2 * S
    assert m["load_balancing_loss"] == pytest.approx(aux.load_balancing_loss.item())


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_experts=st.integers(1, 5),
    top_k=st.integers(1, 3),
    tokens_per_group=st.integers(1, 8),
    num_groups=st.integers(1, 3),
    capacity_factor=st.sampled_from([None, 0.25, 0.5, 1.0, 1.5]),
    min_capacity=st.integers(0, 2),
)
def test_token_choice_equals_naive_loop_property(
    seed, num_experts, top_k, tokens_per_group, num_groups, capacity_factor, min_capacity
):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    layer = make_moe(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                     min_capacity=min_capacity, group_size=tokens_per_group)
    x = torch.randn(tokens_per_group * num_groups, D, requires_grad=True)
    y, aux = layer(x)
    C = token_choice_capacity(tokens_per_group, num_experts, top_k, capacity_factor, min_capacity)
    y_ref, info = naive_token_choice(layer, x, top_k=top_k, capacity=C, group_size=tokens_per_group)
    _compare(layer, x, y, y_ref)
    assert torch.equal(aux.tokens_per_expert, info["tokens_per_expert"])
    assert aux.drop_fraction.item() == pytest.approx(info["num_dropped"] / x.shape[0] / top_k, abs=1e-7)


def test_float32_layer_takes_the_fast_path_and_float64_the_reference(monkeypatch):
    # The equivalence tests above cover the fast grouped matmul in float32 and the reference in float64.
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    layer = make_moe(top_k=2, capacity_factor=1.0)
    layer(torch.randn(S, D))
    assert calls == [torch.float32] * 2  # w_in and w_out
    calls.clear()
    layer.double()(torch.randn(S, D, dtype=torch.float64))
    assert calls == []
