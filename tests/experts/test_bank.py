"""ExpertBank: the stacked experts equal a per-row loop for every activation; init and dropout."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.experts import ExpertBank
from tests._reference import naive_ffn

ACTIVATIONS = ["relu", "gelu", "swiglu", "geglu"]


def _bank(act, E=3, D=8, F=12, **kw):
    bank = ExpertBank(E, D, F, act, **kw)
    with torch.no_grad():  # larger weights than the 0.1 init so the nonlinearity matters
        for p in bank.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return bank


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_forward_equals_per_row_loop(act):
    bank = _bank(act)
    assert (bank.w_gate is not None) == (act in ("swiglu", "geglu"))
    counts = [4, 0, 3]
    x = torch.randn(7, 8)
    y = bank(x, torch.tensor(counts))
    rows = []
    for i, e in enumerate([0, 0, 0, 0, 2, 2, 2]):
        w_gate = bank.w_gate[e] if bank.w_gate is not None else None
        rows.append(naive_ffn(x[i], bank.w_in[e], bank.w_out[e], w_gate, act))
    torch.testing.assert_close(y, torch.stack(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_forward_slots_equals_forward(act):
    bank = _bank(act)
    x = torch.randn(3, 4, 8)
    y_slots = bank.forward_slots(x)
    y = bank(x.reshape(12, 8), torch.tensor([4, 4, 4])).view(3, 4, 8)
    torch.testing.assert_close(y_slots, y, rtol=1e-5, atol=1e-5)


def test_gelu_is_exact_erf_form():
    # One expert, D = F = 1, w_in = w_out = 1: y = gelu(x). gelu(1) = 1 * Phi(1) = 0.8413447 (erf form);
    # the tanh approximation would give 0.8411920.
    bank = ExpertBank(1, 1, 1, "gelu")
    with torch.no_grad():
        bank.w_in.fill_(1.0)
        bank.w_out.fill_(1.0)
    y = bank(torch.tensor([[1.0]], dtype=torch.float32), torch.tensor([1]))
    assert y.item() == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), abs=1e-7)
    assert y.item() == pytest.approx(0.8413447, abs=1e-7)


def test_swiglu_golden():
    # x = 2, w_gate = 1, w_in = 3, w_out = 0.5: y = silu(2) * 6 * 0.5 = (2 / (1 + e^-2)) * 3 = 5.2835835
    bank = ExpertBank(1, 1, 1, "swiglu")
    with torch.no_grad():
        bank.w_gate.fill_(1.0)
        bank.w_in.fill_(3.0)
        bank.w_out.fill_(0.5)
    y = bank(torch.tensor([[2.0]]), torch.tensor([1]))
    assert y.item() == pytest.approx(2 / (1 + math.exp(-2)) * 3, rel=1e-6)


def test_switch_init():
    # std = sqrt(0.1 / fan_in), truncated at 2 std (the truncated normal's std is 0.8796 * sigma).
    bank = ExpertBank(4, 64, 256, "swiglu")
    for w, fan_in in ((bank.w_in, 64), (bank.w_gate, 64), (bank.w_out, 256)):
        sigma = math.sqrt(0.1 / fan_in)
        assert w.abs().max().item() <= 2 * sigma + 1e-7
        assert w.std().item() == pytest.approx(0.8796 * sigma, rel=0.03)


def test_dropout_only_in_training():
    bank = _bank("relu", dropout=0.5)
    x, counts = torch.randn(6, 8), torch.tensor([2, 2, 2])
    bank.eval()
    y_eval = bank(x, counts)
    no_drop = _bank("relu")
    no_drop.load_state_dict(bank.state_dict())
    torch.testing.assert_close(y_eval, no_drop(x, counts))
    bank.train()
    assert not torch.allclose(bank(x, counts), y_eval)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"activation": "tanh"}, r"activation must be one of .* got 'tanh'"),
    ({"dropout": 1.0}, r"expert dropout must be in \[0, 1\), got 1.0"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertBank(2, 4, 4, **kwargs)
