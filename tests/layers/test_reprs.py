"""Reprs a person can read: configs list what differs from their defaults (and evaluate back to an equal config);
an aux prints summary numbers and the decision's shapes, never tensors."""

from __future__ import annotations

import torch

from moekit import MoE, MoEConfig, SoftMoE, SoftMoEConfig
from moekit.models import LMConfig, ViTConfig


def test_config_reprs_show_what_was_set_and_evaluate_back():
    moe = MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2, num_expert_groups=4)
    assert repr(moe) == "MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2, num_expert_groups=4)"
    assert eval(repr(moe)) == moe  # topk_groups, derived from num_expert_groups, is left out and derived again
    lm = LMConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe=MoEConfig(32, 64, 4))
    assert repr(lm) == ("LMConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, d_ff=64, "
                        "moe=MoEConfig(d_model=32, d_ff=64, num_experts=4))")
    assert eval(repr(lm)) == lm
    assert repr(ViTConfig()) == "ViTConfig()"
    soft = SoftMoEConfig(d_model=16, d_ff=32, num_experts=16)
    assert repr(soft) == "SoftMoEConfig(d_model=16, d_ff=32, num_experts=16)" and eval(repr(soft)) == soft


def test_aux_repr_is_one_line_of_numbers():
    torch.manual_seed(0)
    _, aux = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, capacity_factor=None))(torch.randn(2, 8, 16))
    text = repr(aux)
    assert text.startswith("MoEAux(load_balancing_loss=") and "\n" not in text
    assert "tokens_per_expert=[" in text and "routing=TokenChoiceDecision(tokens=16, top_k=1, experts=4" in text
    _, aux = SoftMoE(SoftMoEConfig(d_model=16, d_ff=32, num_experts=16, slots_per_expert=2))(torch.randn(4, 32, 16))
    text = repr(aux)
    assert "tokens_per_expert=[16 experts: min 8, mean 8, max 8]" in text and "\n" not in text and len(text) < 300
    assert text.endswith("routing=SoftRoutingDecision(groups=4, tokens_per_group=32, experts=16, slots_per_expert=2))")
