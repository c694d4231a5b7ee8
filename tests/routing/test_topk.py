"""TopKRouter: softmax before top-k, float32 math, gate normalisation, jitter, noisy top-k, BPR, policies."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.routing import TopKRouter


def _router(d=4, e=3, k=1, **kw) -> TopKRouter:
    r = TopKRouter(d, e, k, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.randn(e, d))
    return r


def test_softmax_before_topk_and_gates_are_probs_for_k1():
    r = _router(k=1)
    x = torch.randn(10, 4)
    dec = r(x)
    probs = torch.softmax(x @ r.weight.detach().t(), dim=-1)
    torch.testing.assert_close(dec.probs_SE, probs)
    torch.testing.assert_close(dec.logits_SE, x @ r.weight.detach().t())
    # Switch: the k=1 gate is the raw softmax probability (not renormalised to 1).
    torch.testing.assert_close(dec.gates_SK[:, 0], probs.max(-1).values)
    assert torch.equal(dec.expert_ids_SK[:, 0], probs.argmax(-1))
    assert (dec.gates_SK < 1).all()


def test_normalize_gates_defaults():
    assert TopKRouter(4, 3, 1).normalize_gates is False
    assert TopKRouter(4, 3, 2).normalize_gates is True
    assert TopKRouter(4, 3, 3).normalize_gates is True
    assert TopKRouter(4, 3, 1, normalize_gates=True).normalize_gates is True
    assert TopKRouter(4, 3, 2, normalize_gates=False).normalize_gates is False


def test_top2_gates_renormalised_by_default():
    # probs = [0.5, 0.3, 0.2] -> top-2 gates [0.5, 0.3] / 0.8 = [0.625, 0.375]
    r = TopKRouter(3, 3, 2)
    with torch.no_grad():
        r.weight.copy_(torch.eye(3))
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    dec = r(x)
    assert dec.expert_ids_SK.tolist() == [[0, 1]]
    torch.testing.assert_close(dec.gates_SK, torch.tensor([[0.625, 0.375]]), rtol=1e-6, atol=1e-6)
    r_raw = TopKRouter(3, 3, 2, normalize_gates=False)
    with torch.no_grad():
        r_raw.weight.copy_(torch.eye(3))
    torch.testing.assert_close(r_raw(x).gates_SK, torch.tensor([[0.5, 0.3]]), rtol=1e-6, atol=1e-6)


def test_jitter_only_in_training():
    # x > 0 and W > 0, so every term of the logit is scaled by a factor in [1-eps, 1+eps]:
    # the jittered logits lie in [(1-eps) * clean, (1+eps) * clean] and differ from the clean ones.
    eps = 0.3
    r = TopKRouter(6, 4, 1, jitter_eps=eps)
    with torch.no_grad():
        r.weight.copy_(torch.rand(4, 6) + 0.1)
    x = torch.rand(16, 6) + 0.1
    clean = x @ r.weight.detach().t()

    r.eval()
    a, b = r(x), r(x)
    torch.testing.assert_close(a.logits_SE, clean)
    assert torch.equal(a.logits_SE, b.logits_SE) and torch.equal(a.gates_SK, b.gates_SK)

    r.train()
    j1, j2 = r(x).logits_SE, r(x).logits_SE
    assert not torch.allclose(j1, clean) and not torch.allclose(j1, j2)
    assert (j1 >= (1 - eps) * clean - 1e-5).all() and (j1 <= (1 + eps) * clean + 1e-5).all()


def test_noisy_topk_gates_sum_to_one_over_kept():
    r = _router(d=6, e=5, k=2, noisy_gating=True)
    with torch.no_grad():
        r.noise_weight.copy_(torch.randn(5, 6))
    x = torch.randn(32, 6)
    r.train()
    dec = r(x)
    torch.testing.assert_close(dec.gates_SK.sum(-1), torch.ones(32))
    assert (dec.gates_SK > 0).all()
    # The noise changes the choices of at least some tokens (std = softplus(x W_noise), here O(1)).
    clean_ids = torch.topk(dec.logits_SE, 2, dim=-1).indices
    assert not torch.equal(dec.expert_ids_SK, clean_ids)
    # Eval: no noise, softmax over the k kept logits = renormalised top-k probabilities.
    r.eval()
    dec = r(x)
    top = torch.topk(dec.probs_SE, 2, dim=-1)
    assert torch.equal(dec.expert_ids_SK, top.indices)
    torch.testing.assert_close(dec.gates_SK, top.values / top.values.sum(-1, keepdim=True))


def test_noisy_gating_noise_weight_starts_at_zero():
    r = TopKRouter(4, 3, 2, noisy_gating=True)
    assert torch.equal(r.noise_weight, torch.zeros(3, 4))
    assert TopKRouter(4, 3, 2).noise_weight is None


@pytest.mark.parametrize(("gate2", "keep_prob"), [(0.1, 0.5), (0.05, 0.25), (0.3, 1.0)])
def test_second_expert_policy_random_keeps_with_prob_gate_over_threshold(gate2, keep_prob):
    # E = 2, k = 2: logits [ln(1-g), ln g] give probs [1-g, g]; normalised top-2 gates are the same
    # (they already sum to 1). The 2nd choice survives with probability min(1, g / 0.2).
    n = 20000
    r = TopKRouter(1, 2, 2, second_expert_policy="random")
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[math.log(1 - gate2)], [math.log(gate2)]]))
    r.train()
    torch.manual_seed(1234)
    dec = r(torch.ones(n, 1))
    torch.testing.assert_close(dec.gates_SK[0], torch.tensor([1 - gate2, gate2]), rtol=1e-5, atol=1e-6)
    assert dec.valid_SK[:, 0].all()  # the first choice is always kept
    rate = dec.valid_SK[:, 1].float().mean().item()
    # Binomial std <= sqrt(0.25 / 20000) = 0.0035: 0.015 is over 4 sigma.
    assert rate == pytest.approx(keep_prob, abs=0.015)
    r.eval()
    assert r(torch.ones(4, 1)).valid_SK is None


def test_second_expert_policy_all_keeps_everything():
    r = _router(k=2)
    r.train()
    assert r(torch.randn(8, 4)).valid_SK is None


def test_batch_priority_orders_by_top1_probability():
    # Token A: probs [0.5, 0.4, 0.1] -> top-1 prob 0.5, renormalised top-2 gate 0.5/0.9 = 0.556
    # Token B: probs [0.45, 0.35, 0.2] -> top-1 prob 0.45, renormalised top-2 gate 0.45/0.8 = 0.5625
    # Token C: probs [0.2, 0.2, 0.6] -> top-1 prob 0.6
    # Priority is by top-1 PROBABILITY (docs/ALGORITHMS.md 1): C, A, B (not C, B, A as the renormalised gates say).
    r = TopKRouter(3, 3, 2, batch_priority=True)
    with torch.no_grad():
        r.weight.copy_(torch.eye(3))
    x = torch.log(torch.tensor([[0.5, 0.4, 0.1], [0.45, 0.35, 0.2], [0.2, 0.2, 0.6]]))
    assert r(x).priority_S.tolist() == [2, 0, 1]
    # Ties keep group order (stable).
    assert r(torch.zeros(4, 3)).priority_S.tolist() == [0, 1, 2, 3]
    assert TopKRouter(3, 3, 2)(x).priority_S is None


def test_router_float32_under_bf16_autocast():
    r = _router(d=8, e=4, k=2)
    x = torch.randn(10, 8)
    expected = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec = r(x)
    assert dec.logits_SE.dtype == torch.float32 and dec.probs_SE.dtype == torch.float32
    assert dec.gates_SK.dtype == torch.float32
    # Autocast is off inside the router: the logits are bit-identical to the float32 ones.
    assert torch.equal(dec.logits_SE, expected.logits_SE)
    assert torch.equal(dec.expert_ids_SK, expected.expert_ids_SK)


def test_router_float32_for_bf16_input():
    r = _router(d=8, e=4)
    x = torch.randn(6, 8).to(torch.bfloat16)
    dec = r(x)
    assert dec.logits_SE.dtype == torch.float32
    torch.testing.assert_close(dec.logits_SE, x.float() @ r.weight.detach().t())


def test_router_dtype_bfloat16_rounds_logits():
    # Only to reproduce Switch Table 2: the matmul runs in bf16, results are returned as float32.
    r = _router(d=8, e=4, router_dtype="bfloat16")
    x = torch.randn(6, 8)
    dec = r(x)
    assert dec.logits_SE.dtype == torch.float32
    expected = torch.nn.functional.linear(x.bfloat16(), r.weight.detach().bfloat16()).float()
    assert torch.equal(dec.logits_SE, expected)


def test_switch_init_std():
    # Truncated normal at +-2 std has std = 0.8796 * sigma, sigma = sqrt(0.1 / 256) = 0.019764.
    r = TopKRouter(256, 64, 1)
    sigma = math.sqrt(0.1 / 256)
    w = r.weight.detach()
    assert w.abs().max().item() <= 2 * sigma + 1e-7
    assert w.std().item() == pytest.approx(0.8796 * sigma, rel=0.03)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 3}, r"top_k must be in \[1, num_experts=2\], got 3"),
        ({"top_k": 0}, r"top_k must be in \[1, num_experts=2\], got 0"),
        ({"jitter_eps": 1.5}, r"jitter_eps must be in \[0, 1\), got 1.5"),
        ({"second_expert_policy": "sometimes"}, r"second_expert_policy .* got 'sometimes'"),
        ({"second_expert_threshold": 0.0}, r"second_expert_threshold must be > 0, got 0.0"),
        ({"router_dtype": "float16"}, r"router_dtype .* got 'float16'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(4, 2, **kwargs)


def test_invalid_num_experts():
    with pytest.raises(ValueError, match=r"num_experts must be >= 1, got 0"):
        TopKRouter(4, 0, 1)
