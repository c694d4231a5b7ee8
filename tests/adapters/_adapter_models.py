"""Tiny random Hugging Face models built in the tests, with no download (helpers for tests/adapters)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0, intermediate_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=intermediate_size, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2Model(cfg).eval()


# Tiny transformers v5 MoE decoders (random, float32, eval mode). Their fused experts are created with torch.empty and
# filled by the model's init; the per-family keyword names differ, hence one builder per family.
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")


def tiny_moe_config(family: str, num_experts: int = 4, top_k: int = 2, layers: int = 1):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=num_experts, moe_intermediate_size=16, intermediate_size=64,
                                           head_dim=8, norm_topk_prob=True, **common)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=num_experts, intermediate_size=16, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=num_experts, moe_intermediate_size=16, intermediate_size=64,
                                           shared_expert_intermediate_size=24, **common)
    if family == "olmoe":
        return transformers.OlmoeConfig(num_experts=num_experts, intermediate_size=16, **common)
    raise ValueError(family)


def tiny_moe_lm(family: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family, **kw)).eval()
