"""A tiny MoE language model and a tiny MoE encoder-decoder for the analysis and distillation tests (built, never
trained)."""

from __future__ import annotations

import torch

from moekit.layers.config import MoEConfig
from moekit.models import TransformerLM
from moekit.models.config import LMConfig
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_config import Seq2SeqConfig


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


def tiny_seq2seq_config(num_experts: int = 4, top_k: int = 1, capacity_factor: float | None = 1.0,
                        dense_before_moe: bool = False, vocab: int = 50) -> Seq2SeqConfig:
    """3 encoder and 2 decoder blocks, MoE at block 1 of each stack (Switch's layout), gated GELU (T5 v1.1)."""
    moe = MoEConfig(d_model=16, d_ff=24, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                    activation="geglu_tanh", min_capacity=1)
    return Seq2SeqConfig(vocab_size=vocab, d_model=16, n_heads=2, d_ff=24, n_encoder_layers=3, n_decoder_layers=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20, encoder_moe=moe,
                         decoder_moe=moe, dense_before_moe=dense_before_moe, eos_token_id=1)


def tiny_seq2seq(seed: int = 0, **kw: object) -> Seq2SeqLM:
    torch.manual_seed(seed)
    model = Seq2SeqLM(tiny_seq2seq_config(**kw))
    with torch.no_grad():  # decisive routers, as for tiny_moe
        for layer in model.moe_layers:
            layer.router.weight.normal_(0.0, 1.0)
    return model.eval()
