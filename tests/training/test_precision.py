"""bf16 autocast trains with the router and the losses in float32; the learning rate follows the schedule."""

from __future__ import annotations

import math

import numpy as np
import torch

from moekit import MoEConfig
from moekit.data.batches import TokenBatches
from moekit.models import LMConfig, TransformerLM
from moekit.training import TrainConfig, Trainer
from moekit.training.metrics import read_metrics


def _run(tmp_path, **cfg):
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=None)
    lm = TransformerLM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe=moe))
    values = dict(
        max_steps=6,
        batch_size=2,
        log_every=1,
        eval_every=3,
        checkpoint_every=0,
        warmup_steps=2,
        progress="off",
    )
    values.update(cfg)
    tokens = np.random.default_rng(0).integers(0, 40, 2000).astype(np.int32)
    trainer = Trainer(TrainConfig(**values), lm, TokenBatches(tokens, 2, 8, seed=0), tokens[:200], tmp_path)
    return trainer, trainer.fit()


def test_bf16_autocast_keeps_router_and_losses_float32(tmp_path):
    trainer, result = _run(tmp_path, precision="bf16")
    assert result.step == 6 and result.skipped_steps == 0 and math.isfinite(result.final_val_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = torch.randint(0, 40, (2, 8))
        out = trainer.model(tokens, tokens)
    assert out.logits_BTV.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and out.aux[0].routing.logits_SE.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay float32


def test_logged_learning_rate_follows_warmup_then_cosine(tmp_path):
    _, _ = _run(tmp_path, lr=1.0e-3, min_lr_ratio=0.0)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    # warm-up over 2 steps: 0.5e-3, 1e-3; then cosine over 4 steps from 1e-3: step index 2 -> progress 0
    assert lrs[:3] == [0.5e-3, 1e-3, 1e-3]
    assert lrs[3] == 1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 4))


def test_auto_threads_back_off_on_a_busy_machine(monkeypatch):
    from moekit.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(trainer_module.torch, "get_num_threads", lambda: 2)
    for load, expected in ((0.2, 2), (0.6, 1), (1.4, 1), (4.8, 1)):
        monkeypatch.setattr(trainer_module.os, "getloadavg", lambda load=load: (load, load, load))
        assert trainer_module.resolve_threads(0) == expected, load
    assert trainer_module.resolve_threads(3) == 3  # an explicit request is kept
