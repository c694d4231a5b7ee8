"""A tiny MoE language model for the analysis and distillation tests (built, never trained)."""

from __future__ import annotations

import torch

from moekit.layers.config import MoEConfig
from moekit.models import TransformerLM
from moekit.models.config import LMConfig


def tiny_moe_config(top_k: int = 2, capacity_factor: float | None = 1.0, vocab: int = 50,
                    activation: str = "gelu") -> LMConfig:
    """4 blocks, MoE at blocks 1 and 3 with 4 experts; CF 1.0 so that some choices are dropped."""
    moe = MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=top_k, capacity_factor=capacity_factor,
                    activation=activation, min_capacity=1)
    return LMConfig(vocab_size=vocab, d_model=16, n_layers=4, n_heads=2, d_ff=24, max_seq_len=16,
                    activation=activation, moe=moe)


def tiny_moe(seed: int = 0, **kw: object) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(tiny_moe_config(**kw))
    # Larger router weights than the 0.1-scale init, so routing is decisive and capacity really binds.
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.normal_(0.0, 1.0)
    return model.eval()
