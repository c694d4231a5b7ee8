"""SoftRouter: L2-normalised logits times learned scale; dispatch softmax over tokens, combine over slots."""

from __future__ import annotations

import pytest
import torch

from moekit.routing import SoftRouter


def test_dispatch_and_combine_are_convex():
    r = SoftRouter(8, 3, slots_per_expert=2)
    x = torch.randn(4, 5, 8)
    d = r(x)
    dispatch, combine, logits = d.dispatch_BMEP, d.combine_BMEP, d.logits_BMEP
    assert dispatch.shape == combine.shape == logits.shape == (4, 5, 3, 2)
    # Each slot is a convex mix of the group's tokens; each token a convex mix of all slots.
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(4, 3, 2))
    torch.testing.assert_close(combine.sum(dim=(2, 3)), torch.ones(4, 5))
    assert (dispatch >= 0).all() and (combine >= 0).all()


def test_logits_are_scaled_cosine_similarities():
    r = SoftRouter(6, 2, slots_per_expert=3)
    assert r.phi.shape == (6, 2, 3) and r.scale.item() == 1.0
    x = torch.randn(2, 4, 6)
    logits = r.logits(x)
    xn = x / x.norm(dim=-1, keepdim=True)
    phin = r.phi.detach() / r.phi.detach().norm(dim=0, keepdim=True)
    torch.testing.assert_close(logits, torch.einsum("bmd,dep->bmep", xn, phin), rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= 1.0 + 1e-6  # |cosine| <= 1 at scale 1
    # Scaling a token does not change its logits (normalisation); the learned scale multiplies them.
    torch.testing.assert_close(r.logits(3.0 * x), logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        r.scale.fill_(2.5)
    torch.testing.assert_close(r.logits(x), 2.5 * logits, rtol=1e-5, atol=1e-6)


def test_scale_init_sets_the_learned_scale_and_survives_a_reset():
    # scale_init = sqrt(D): the logits are sqrt(D) times the cosines, so for a token of norm sqrt(D) (a LayerNorm
    # output) and unit slot directions they equal the un-normalised logits x @ phin.
    D = 16
    r = SoftRouter(D, 4, slots_per_expert=2, scale_init=D**0.5)
    assert r.scale.item() == pytest.approx(4.0) and r.scale.requires_grad
    x = torch.nn.functional.layer_norm(torch.randn(3, 5, D), (D,))  # every token of norm sqrt(D), up to eps
    phin = r.phi.detach() / r.phi.detach().norm(dim=0, keepdim=True)
    torch.testing.assert_close(r.logits(x), torch.einsum("bmd,dep->bmep", x, phin), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        r.scale.fill_(0.5)
    r.reset_parameters()
    assert r.scale.item() == pytest.approx(4.0)  # a reset goes back to scale_init, not to 1.0


def test_zero_token_stays_finite():
    r = SoftRouter(4, 2)
    x = torch.zeros(1, 3, 4)
    d = r(x)
    dispatch, _combine, logits = d.dispatch_BMEP, d.combine_BMEP, d.logits_BMEP
    assert torch.isfinite(logits).all() and torch.isfinite(dispatch).all()
    torch.testing.assert_close(dispatch, torch.full((1, 3, 2, 1), 1 / 3))  # all logits 0: uniform


def test_float32_under_autocast():
    r = SoftRouter(8, 2)
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = r(x)
    dispatch, combine, logits = d.dispatch_BMEP, d.combine_BMEP, d.logits_BMEP
    assert logits.dtype == dispatch.dtype == combine.dtype == torch.float32
    torch.testing.assert_close(logits, r.logits(x), rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_experts": 0}, r"num_experts must be >= 1, got 0"),
    ({"num_experts": 2, "slots_per_expert": 0}, r"slots_per_expert must be >= 1, got 0"),
    ({"num_experts": 2, "scale_init": 0.0}, r"scale_init must be a finite number > 0, got 0.0"),
    ({"num_experts": 2, "scale_init": float("nan")}, r"scale_init must be a finite number > 0, got nan"),
    ({"num_experts": 2, "scale_init": True}, r"scale_init must be a finite number > 0, got True"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftRouter(4, **kwargs)
