"""The bank's fused CPU path (experts/fused.py) against autograd over ``feed_forward``: outputs and every gradient
equal to float rounding, for every activation, with empty experts, with gate and up paired in one storage or not;
and the paired layout keeps parameter names, state-dict keys and old checkpoints working.

Shape legend: A rows in expert order, D model width, F expert hidden width, E experts.
"""

from __future__ import annotations

import pytest
import torch

from moekit.experts import ExpertBank
from moekit.experts.activations import ACTIVATIONS
from moekit.experts.ffn import feed_forward
from moekit.experts.fused import fused_ok, gate_up_view
from moekit.ops.grouped_mm import grouped_mm

E, D, F = 4, 16, 32
RTOL, ATOL = 1e-5, 1e-5  # float32 rounding of O(1)-O(10) values (GEMMs grouped differently)


def _bank(act: str, seed: int = 0) -> ExpertBank:
    torch.manual_seed(seed)
    bank = ExpertBank(E, D, F, act)
    with torch.no_grad():  # O(1) weights so that the nonlinearity matters
        for p in bank.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return bank


def _unfused(bank: ExpertBank, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Autograd over the shared FFN code with the per-expert reference matmul: the path before fusion."""
    return feed_forward(x_AD, bank.w_in, bank.w_gate, bank.w_out, bank.activation,
                        matmul=lambda a, w: grouped_mm(a, w, counts_E, backend="reference"))


def _grads(bank: ExpertBank, x_AD: torch.Tensor, fn, gy_AD: torch.Tensor | None) -> list[torch.Tensor]:
    bank.zero_grad(set_to_none=True)
    x_AD.grad = None
    y_AD = fn()
    (y_AD.sum() if gy_AD is None else (y_AD * gy_AD).sum()).backward()
    return [y_AD.detach(), x_AD.grad, *(p.grad for p in bank.parameters())]


def _assert_fused_matches_reference(bank: ExpertBank, x_AD: torch.Tensor, counts_E: torch.Tensor,
                                    gy_AD: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Output and every gradient of the fused path equal the unfused reference's (None where neither has one).
    The fused path runs last, so the bank's ``.grad`` are its gradients afterwards; returns them as ``_grads`` does."""
    ref = _grads(bank, x_AD, lambda: _unfused(bank, x_AD, counts_E), gy_AD)
    fused = _grads(bank, x_AD, lambda: bank(x_AD, counts_E), gy_AD)
    for a, b in zip(fused, ref, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    return fused


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("counts", [[4, 0, 3, 5], [0, 0, 12, 0], [3, 3, 3, 3]])
def test_fused_equals_unfused_outputs_and_gradients(act, counts):
    bank = _bank(act)
    counts_E = torch.tensor(counts)
    x_AD = torch.randn(sum(counts), D, requires_grad=True)
    gy_AD = torch.randn(sum(counts), D)
    assert fused_ok(x_AD, bank.w_in, bank.w_out, act, bank.dropout, bank.training)
    fused = _assert_fused_matches_reference(bank, x_AD, counts_E, gy_AD)
    assert len(fused) == 2 + len(list(bank.parameters())) and all(g is not None for g in fused)
    # The fused path's weight gradients are plain contiguous tensors of the parameters' shapes (no copies of a
    # fused gradient).
    for p in bank.parameters():
        assert p.grad.shape == p.shape and p.grad.is_contiguous()


def test_fused_takes_an_expanded_gradient():
    """``y.sum()`` hands backward an expanded (stride-0) gradient, which ``torch._grouped_mm`` rejects."""
    bank = _bank("swiglu")
    counts_E = torch.tensor([2, 3, 0, 1])
    _assert_fused_matches_reference(bank, torch.randn(6, D, requires_grad=True), counts_E, None)


def test_frozen_weights_get_no_gradient():
    bank = _bank("geglu")
    bank.w_gate.requires_grad_(False)
    bank.w_out.requires_grad_(False)
    counts_E = torch.tensor([2, 3, 0, 1])
    x_AD = torch.randn(6, D, requires_grad=True)
    bank(x_AD, counts_E).sum().backward()
    assert bank.w_gate.grad is None and bank.w_out.grad is None
    assert bank.w_in.grad is not None and x_AD.grad is not None


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_gate_and_up_share_one_storage(act):
    bank = _bank(act)
    assert bank.gate_up_paired
    w_up = gate_up_view(bank.w_gate, bank.w_in)
    assert w_up.shape == (E, D, 2 * F)
    torch.testing.assert_close(w_up, torch.cat([bank.w_gate, bank.w_in], dim=-1), rtol=0, atol=0)
    # Names, shapes and state-dict keys as before the paired layout.
    assert [n for n, _ in bank.named_parameters()] == ["w_in", "w_gate", "w_out"]
    assert list(bank.state_dict()) == ["w_in", "w_gate", "w_out"]
    assert bank.w_in.shape == bank.w_gate.shape == (E, D, F)


def test_writes_through_the_names_reach_the_fused_path():
    """``w_in`` / ``w_gate`` stay writable: in-place writes keep the pairing and change what the bank computes."""
    bank = _bank("swiglu")
    counts_E = torch.tensor([2, 3, 0, 1])
    x_AD = torch.randn(6, D)
    with torch.no_grad():
        bank.w_gate[1].zero_()
        bank.w_in.mul_(2.0)
    assert bank.gate_up_paired
    with torch.no_grad():
        torch.testing.assert_close(bank(x_AD, counts_E), _unfused(bank, x_AD, counts_E), rtol=RTOL, atol=ATOL)
        assert bank(x_AD, counts_E)[2:5].abs().max() == 0  # expert 1's gate is zero: its rows give 0


def test_replaced_parameter_falls_back_and_stays_correct():
    bank = _bank("swiglu")
    bank.w_in = torch.nn.Parameter(bank.w_in.detach().clone())  # a user's own tensor: no longer paired
    assert not bank.gate_up_paired
    counts_E = torch.tensor([2, 3, 0, 1])
    x_AD = torch.randn(6, D, requires_grad=True)
    _assert_fused_matches_reference(bank, x_AD, counts_E, torch.randn(6, D))
    bank.pair_gate_up_()
    assert bank.gate_up_paired


def test_old_checkpoint_loads_and_keeps_the_pairing():
    """A state dict of separate contiguous ``w_in`` / ``w_gate`` tensors (every checkpoint so far) loads in place."""
    src = _bank("swiglu", seed=1)
    old_sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    assert all(v.is_contiguous() for v in old_sd.values())
    bank = _bank("swiglu", seed=2)
    bank.load_state_dict(old_sd)
    assert bank.gate_up_paired
    for k, v in old_sd.items():
        assert torch.equal(getattr(bank, k), v)
    counts_E = torch.tensor([2, 3, 0, 1])
    x_AD = torch.randn(6, D)
    with torch.no_grad():
        torch.testing.assert_close(bank(x_AD, counts_E), src(x_AD, counts_E), rtol=0, atol=0)


def test_dtype_moves_pair_again():
    bank = _bank("swiglu").to(torch.bfloat16)
    assert bank.w_in.dtype == torch.bfloat16 and bank.gate_up_paired
    bank = bank.to(torch.float64)  # float64 runs the unfused path; the layout is still paired
    assert bank.gate_up_paired
    x_AD = torch.randn(6, D, dtype=torch.float64)
    assert not fused_ok(x_AD, bank.w_in, bank.w_out, bank.activation, 0.0, False)
    torch.testing.assert_close(bank(x_AD, torch.tensor([2, 3, 0, 1])),
                               _unfused(bank, x_AD, torch.tensor([2, 3, 0, 1])))


def test_seeded_init_unchanged_by_the_layout():
    """Weights are drawn into contiguous tensors: the same seed gives the same values as separate tensors would."""
    torch.manual_seed(0)
    bank = ExpertBank(E, D, F, "swiglu")
    torch.manual_seed(0)
    w_in = torch.empty(E, D, F)
    w_gate = torch.empty(E, D, F)
    from moekit.init import switch_init_

    switch_init_(w_in, fan_in=D, init_scale=0.1)
    switch_init_(w_gate, fan_in=D, init_scale=0.1)
    assert torch.equal(bank.w_in, w_in) and torch.equal(bank.w_gate, w_gate)


def test_dropout_in_training_uses_the_unfused_path():
    bank = ExpertBank(E, D, F, "swiglu", dropout=0.5).train()
    x_AD = torch.randn(6, D)
    assert not fused_ok(x_AD, bank.w_in, bank.w_out, bank.activation, bank.dropout, bank.training)
    assert fused_ok(x_AD, bank.w_in, bank.w_out, bank.activation, bank.dropout, False)


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_retained_graph_backward_twice_accumulates(act):
    """Two autograd nodes, each releasing what it saved only when the graph is not retained: a second backward
    through a retained graph gives the same gradients again (accumulated: twice the reference)."""
    bank = _bank(act)
    counts_E = torch.tensor([3, 0, 4, 2])
    x_AD = torch.randn(9, D, requires_grad=True)
    gy_AD = torch.randn(9, D)
    ref = _grads(bank, x_AD, lambda: _unfused(bank, x_AD, counts_E), gy_AD)
    bank.zero_grad(set_to_none=True)
    x_AD.grad = None
    loss = (bank(x_AD, counts_E) * gy_AD).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    for got, want in zip([x_AD.grad, *(p.grad for p in bank.parameters())], ref[1:], strict=True):
        torch.testing.assert_close(got, 2 * want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("retain", [False, True])
def test_pre_activation_is_freed_before_the_first_half_backward(retain):
    """The memory property the split into two nodes is for: by the time the gate/up node computes its weight
    gradients, autograd has released the [A, 2F] pre-activation that the second node saved (unless the graph is
    retained)."""
    bank = _bank("swiglu")
    counts_E = torch.tensor([3, 1, 4, 2])
    x_AD = torch.randn(10, D, requires_grad=True)
    y_AD = bank(x_AD, counts_E)
    act_down = y_AD.grad_fn
    gate_up = act_down.next_functions[0][0]
    seen = {}

    def probe(grad_outputs):
        # Runs as the gradient of h reaches the first half, before any of its GEMMs.
        seen["grad_h"] = grad_outputs[0].shape
        try:
            seen["saved"] = [t.shape for t in act_down.saved_tensors]
        except RuntimeError as e:  # "... saved tensors ... have already been freed"
            seen["freed"] = str(e)

    gate_up.register_prehook(probe)
    y_AD.sum().backward(retain_graph=retain)
    assert seen["grad_h"] == torch.Size([10, 2 * F])
    if retain:
        assert seen.get("saved", [None])[0] == torch.Size([10, 2 * F])
    else:
        assert "freed" in seen and "freed" in seen["freed"]


@pytest.mark.parametrize("act", ["swiglu", "relu"])
@pytest.mark.parametrize("grad_x, trainable", [(False, ("w_in", "w_gate", "w_out")), (True, ("w_out",)),
                                               (False, ("w_out",)), (True, ())])
def test_fused_with_only_some_inputs_needing_gradients(act, grad_x, trainable):
    """x with or without a gradient, some weights frozen: each node skips what nobody needs, and the gradients that
    are needed match the reference."""
    bank = _bank(act)
    for name, p in bank.named_parameters():
        p.requires_grad_(name in trainable)
    x_AD = torch.randn(9, D, requires_grad=grad_x)
    _assert_fused_matches_reference(bank, x_AD, torch.tensor([2, 3, 0, 4]), torch.randn(9, D))
