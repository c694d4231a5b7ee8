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
