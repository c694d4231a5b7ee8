"""DenseFFN: hand-computed values, and one expert (E = 1, top-1, dropless) equals it for every activation."""

from __future__ import annotations

import pytest
import torch

from moekit import DenseFFN, MoE, MoEConfig
from tests._reference import naive_ffn

ACTIVATIONS = ["relu", "gelu", "swiglu", "geglu"]


def test_relu_golden():
    # x = [1, -2]; w_in = [[1, 0, 1], [0, 1, 1]] -> x w_in = [1, -2, -1] -> relu = [1, 0, 0]
    # w_out = [[2, 3], [5, 7], [11, 13]] -> [1 * 2, 1 * 3] = [2, 3]
    ffn = DenseFFN(2, 3, "relu")
    with torch.no_grad():
        ffn.w_in.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        ffn.w_out.copy_(torch.tensor([[2.0, 3.0], [5.0, 7.0], [11.0, 13.0]]))
    y, aux = ffn(torch.tensor([[1.0, -2.0]]))
    assert y.tolist() == [[2.0, 3.0]] and aux is None  # the (y, aux) protocol of every FFN; dense has no aux


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_equals_naive(activation):
    ffn = DenseFFN(8, 16, activation)
    x = torch.randn(5, 8)
    want = torch.stack([naive_ffn(x[i], ffn.w_in, ffn.w_out, ffn.w_gate, activation) for i in range(5)])
    torch.testing.assert_close(ffn(x)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_equals_dense(activation, capacity_factor):
    # E = 1: softmax over one logit is exactly 1, so the gate is 1 and every token goes to the one expert.
    # CF 1.0 gives C = ceil(1 * 1 * S / 1) = S: nothing is dropped either.
    d, f, n = 8, 16, 10
    moe = MoE(MoEConfig(d_model=d, d_ff=f, num_experts=1, top_k=1, capacity_factor=capacity_factor,
                        activation=activation))
    dense = DenseFFN(d, f, activation)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        dense.w_in.copy_(moe.experts.w_in[0])
        dense.w_out.copy_(moe.experts.w_out[0])
        if dense.w_gate is not None:
            dense.w_gate.copy_(moe.experts.w_gate[0])
    x = torch.randn(2, n // 2, d, requires_grad=True)
    y_moe, aux = moe(x)
    y_dense, _ = dense(x)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_dense)
    (gx_moe,) = torch.autograd.grad((y_moe * g).sum(), [x])
    (gx_dense,) = torch.autograd.grad((y_dense * g).sum(), [x])
    torch.testing.assert_close(gx_moe, gx_dense, rtol=1e-5, atol=1e-6)
    assert aux.routing.gates_SK.eq(1.0).all()
    assert aux.drop_fraction.item() == 0.0 and aux.tokens_per_expert.tolist() == [n]
    # L_B = 1 * f * P = 1 * 1 * 1; L_Z = mean(logit^2) since logsumexp of one logit is the logit itself.
    assert aux.load_balancing_loss.item() == 1.0
    logits = aux.routing.logits_SE
    torch.testing.assert_close(aux.z_loss, (logits**2).mean())


def test_dropout_only_in_training():
    ffn = DenseFFN(8, 16, "relu", dropout=0.5)
    x = torch.randn(4, 8)
    ffn.eval()
    y1, y2 = ffn(x)[0], ffn(x)[0]
    assert torch.equal(y1, y2)
    ffn.train()
    assert not torch.allclose(ffn(x)[0], y1)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"input width must equal d_model=8, got shape \(2, 7\)"):
        DenseFFN(8, 16)(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"activation must be one of .* got 'swish'"):
        DenseFFN(8, 16, "swish")
