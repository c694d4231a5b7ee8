"""The trainer writes ``mean_gate`` (mean over MoE layers of MoEAux.mean_gate) into each training record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.data.batches import TokenBatches
from moekit.models import LMConfig, TransformerLM
from moekit.training import TrainConfig, Trainer
from moekit.training.metrics import read_metrics


def _fit(tmp_path, moe: MoEConfig | None, n_layers: int = 4) -> list[dict]:
    torch.manual_seed(0)
    lm = TransformerLM(
        LMConfig(vocab_size=40, d_model=16, n_layers=n_layers, n_heads=2, d_ff=32, max_seq_len=8, moe=moe)
    )
    with torch.no_grad():  # every router uniform: all logits 0
        for name, p in lm.named_parameters():
            if name.endswith("router.weight"):
                p.zero_()
    config = TrainConfig(
        max_steps=1, batch_size=2, log_every=1, eval_every=0, checkpoint_every=0, warmup_steps=0, progress="off"
    )
    tokens = np.random.default_rng(0).integers(0, 40, 2000).astype(np.int32)
    Trainer(config, lm, TokenBatches(tokens, 2, 8, seed=0), tokens[:200], tmp_path, log=lambda m: None).fit()
    return [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]


def test_uniform_routers_give_one_over_experts(tmp_path):
    # Zero router weights: every token's softmax over 4 experts is (1/4, 1/4, 1/4, 1/4), so the top-1 gate of every
    # token in both MoE layers (blocks 1 and 3) is 1/4, and so is their mean. Step 1's record is measured in the
    # forward pass before the first update moves the routers.
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=1, capacity_factor=None)
    (record,) = _fit(tmp_path, moe)
    assert record["mean_gate"] == pytest.approx(0.25)
    assert record["drop_fraction"] == 0.0


def test_dense_model_has_no_mean_gate(tmp_path):
    (record,) = _fit(tmp_path, None)
    assert "mean_gate" not in record and "router_entropy" not in record
