"""Tiny random Hugging Face models of every family moekit reads, built from configs (nothing downloads)."""

from __future__ import annotations

import torch

# Shared sizes: 3-4 layers, grouped-query attention (4 query heads, 2 key/value heads), several experts.
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
FAMILY_KWARGS = {
    "llama": dict(intermediate_size=48, attention_bias=True),
    "qwen2": dict(intermediate_size=48),
    "qwen3": dict(intermediate_size=48, head_dim=12, tie_word_embeddings=True),
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    # MoE in blocks 1 and 3 only (decoder_sparse_step 2), with a dense block forced by mlp_only_layers too.
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[0], num_hidden_layers=4),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=2, head_dim=16, num_hidden_layers=4),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                  attention_bias=False),
}
FAMILIES = tuple(FAMILY_KWARGS)


def tiny_hf_model(model_type: str, seed: int = 0, scale: float = 0.15, **overrides):
    """A float32, eval-mode transformers model of ``model_type`` with weights ~ N(0, scale^2) (norm weights around
    1), large enough that routing is far from uniform and logits are O(1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**COMMON, **FAMILY_KWARGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                s = 0.5 if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] < 16 else scale
                p.copy_(torch.randn(p.shape, generator=gen) * s)
    return model
