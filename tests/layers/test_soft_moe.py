"""Soft MoE equals a direct einsum reading of docs/ALGORITHMS.md 4; slots are convex mixes; no batch effects."""

from __future__ import annotations

import pytest
import torch

from moekit import SoftMoE, SoftMoEConfig
from tests._reference import naive_ffn

B, M, D, F, E, P = 3, 6, 8, 12, 2, 3


def make_soft(activation="gelu", num_experts=E, slots=P) -> SoftMoE:
    layer = SoftMoE(SoftMoEConfig(d_model=D, d_ff=F, num_experts=num_experts, slots_per_expert=slots,
                                  activation=activation))
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        layer.router.scale.fill_(3.0)  # sharper softmaxes than at init, so mistakes in the axes show
    return layer


def soft_moe_einsum(layer: SoftMoE, X: torch.Tensor) -> torch.Tensor:
    """docs/ALGORITHMS.md section 4, line by line, for X of shape [B, m, d]."""
    phi, scale = layer.router.phi, layer.router.scale
    n, p = phi.shape[1], phi.shape[2]
    Xn = X / X.norm(dim=-1, keepdim=True)  # over d
    Phin = phi / phi.norm(dim=0, keepdim=True)  # over d
    L = scale * torch.einsum("bmd,dnp->bmnp", Xn, Phin)
    Dw = torch.softmax(L, dim=1)  # over tokens m
    Cw = torch.softmax(L.reshape(*L.shape[:2], n * p), dim=-1).reshape(L.shape)  # over all n*p slots
    slots = torch.einsum("bmnp,bmd->bnpd", Dw, X)  # the ORIGINAL X
    bank = layer.experts
    out = torch.stack(
        [
            naive_ffn(slots[:, i], bank.w_in[i], bank.w_out[i],
                      bank.w_gate[i] if bank.w_gate is not None else None, layer.config.activation)
            for i in range(n)
        ],
        dim=1,
    )  # [b, n, p, d]
    return torch.einsum("bmnp,bnpd->bmd", Cw, out)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize(("num_experts", "slots"), [(E, P), (4, 1)])
def test_equals_einsum_reference_outputs_and_grads(activation, num_experts, slots):
    layer = make_soft(activation, num_experts, slots)
    x = torch.randn(B, M, D, requires_grad=True)
    y, aux = layer(x)
    y_ref = soft_moe_einsum(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    params = [x, layer.router.phi, layer.router.scale, layer.experts.w_in, layer.experts.w_out]
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((y_ref * g).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # No aux loss, no dropping; every expert processes B * P slots.
    assert aux.load_balancing_loss.item() == 0.0 and aux.drop_fraction.item() == 0.0
    assert aux.tokens_per_expert.tolist() == [B * slots] * num_experts


def test_dispatch_and_combine_are_convex():
    layer = make_soft()
    y, aux = layer(torch.randn(B, M, D))
    dispatch, combine = aux.routing.dispatch_BMEP, aux.routing.combine_BMEP
    assert dispatch.shape == combine.shape == (B, M, E, P)
    # Each slot: weights over the M tokens sum to 1. Each token: weights over all E*P slots sum to 1.
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(B, E, P))
    torch.testing.assert_close(combine.sum(dim=(2, 3)), torch.ones(B, M))
    assert (dispatch >= 0).all() and (combine >= 0).all()


def test_identical_tokens_make_identical_slots():
    # A convex mix of M copies of v is v, so with one expert every token's output is exactly FFN(v).
    layer = make_soft(num_experts=1, slots=2)
    v = torch.randn(D)
    y, _ = layer(v.expand(2, M, D).contiguous())
    bank = layer.experts
    expected = naive_ffn(v, bank.w_in[0], bank.w_out[0], None, "gelu")
    torch.testing.assert_close(y, expected.expand(2, M, D), rtol=1e-5, atol=1e-6)


def test_slots_lie_in_the_tokens_convex_hull():
    # With 1-D tokens, every slot value lies between the smallest and largest token of its group.
    layer = SoftMoE(SoftMoEConfig(d_model=4, d_ff=4, num_experts=2, slots_per_expert=2))
    x = torch.randn(3, 5, 4)
    dispatch = layer.router(x).dispatch_BMEP
    slots = torch.einsum("bmep,bmd->bepd", dispatch, x)
    lo = x.min(dim=1).values[:, None, None, :]
    hi = x.max(dim=1).values[:, None, None, :]
    assert ((slots >= lo - 1e-6) & (slots <= hi + 1e-6)).all()


def test_no_cross_example_effects():
    layer = make_soft()
    x = torch.randn(4, M, D)
    y, _ = layer(x)
    x2 = x.clone()
    x2[1] = torch.randn(M, D) * 5
    y2, _ = layer(x2)
    others = [0, 2, 3]
    torch.testing.assert_close(y2[others], y[others], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[1], y[1])
    # Each row alone gives the same output as inside the batch; a 2-D input is one group.
    for b in range(4):
        torch.testing.assert_close(layer(x[b : b + 1])[0][0], y[b], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x[b])[0], y[b], rtol=0, atol=1e-6)


def test_leading_dims():
    layer = make_soft()
    x = torch.randn(2, 3, M, D)
    y, _ = layer(x)
    assert y.shape == (2, 3, M, D)
    torch.testing.assert_close(y.reshape(6, M, D), layer(x.reshape(6, M, D))[0], rtol=0, atol=1e-6)


def test_router_float32_under_bf16_autocast():
    layer = make_soft()
    x = torch.randn(B, M, D)
    y32, aux32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    dispatch, combine = aux.routing.dispatch_BMEP, aux.routing.combine_BMEP
    assert dispatch.dtype == combine.dtype == torch.float32
    torch.testing.assert_close(dispatch, aux32.routing.dispatch_BMEP, rtol=0, atol=0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((B, M, D + 1), r"SoftMoE expects \[..., M, d_model=8\], got shape \(3, 6, 9\)"), ((D,), "got shape"),
     ((B, 0, D), "group with no tokens")],
)
def test_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        make_soft()(torch.randn(*shape))


def test_requires_config():
    with pytest.raises(ValueError, match="SoftMoE expects a SoftMoEConfig, got MoEConfig"):
        from moekit import MoEConfig

        SoftMoE(MoEConfig(d_model=4, d_ff=4, num_experts=2))
