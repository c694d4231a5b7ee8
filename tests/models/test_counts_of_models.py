"""``parameter_counts`` and ``flops_per_token`` take a model or its config, for every model kind they count, and
refuse anything else in one line naming what they take."""

from __future__ import annotations

import pytest

from moekit import MoEConfig
from moekit.models import (
    LMConfig,
    TransformerLM,
    ViT,
    ViTConfig,
    flops_per_token,
    parameter_counts,
    vit_parameter_counts,
)


def test_a_model_counts_as_its_config():
    config = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                      moe=MoEConfig(d_model=32, d_ff=64, num_experts=4))
    model = TransformerLM(config)
    assert parameter_counts(model) == parameter_counts(config) == {
        "total": 31008, "active": 18720, "embedding": 2048, "expert": 16384}
    assert parameter_counts(model)["total"] == sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, seq_len=16) == flops_per_token(config, seq_len=16) == {
        "forward": 39168, "train": 117504}
    vit = ViTConfig()
    assert parameter_counts(vit) == vit_parameter_counts(vit) == parameter_counts(ViT(vit))


def test_other_values_are_refused_in_one_line():
    with pytest.raises(TypeError, match=r"^parameter_counts takes a model config \(LMConfig, ViTConfig, "
                                        r"Seq2SeqConfig\) or a model built from one, got int$"):
        parameter_counts(3)
    with pytest.raises(TypeError, match=r"^parameter_counts takes an LMConfig, ViTConfig or Seq2SeqConfig \(or a "
                                        r"model built from one\), got MoEConfig$"):
        parameter_counts(MoEConfig(8, 16, 2))
    with pytest.raises(TypeError, match=r"^flops_per_token takes an LMConfig or a TransformerLM, got ViTConfig; "
                                        r"use moekit.models.vit_flops_per_image$"):
        flops_per_token(ViTConfig())
