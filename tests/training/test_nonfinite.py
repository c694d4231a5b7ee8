"""The non-finite policy (GLaM): skip the update of a NaN/Inf batch, roll back after repeated skips, or
raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from moekit import MoEConfig
from moekit.data.batches import TokenBatches
from moekit.errors import MoekitError
from moekit.models import LMConfig, TransformerLM
from moekit.training import TrainConfig, Trainer
from moekit.training.metrics import read_metrics


class NaNInjector(nn.Module):
    """Wraps the LM; on the listed training calls (1-based) makes the loss NaN ("loss") or only the gradients
    ("grad": a hook on the logits turns their gradient into NaN while the loss stays finite)."""

    def __init__(self, model: nn.Module, bad: dict[int, str]) -> None:
        super().__init__()
        self.model = model
        self.bad = bad
        self.calls = 0

    def forward(self, inputs, targets):
        out = self.model(inputs, targets)
        if not self.training:
            return out
        self.calls += 1
        kind = self.bad.get(self.calls)
        if kind == "loss":
            out.loss = out.loss * float("nan")
        elif kind == "grad":
            out.logits_BTV.register_hook(lambda g: g * float("nan"))
        return out


def _trainer(tmp_path, bad, **cfg) -> Trainer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=1, capacity_factor=1.25)
    lm = TransformerLM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe=moe))
    values = dict(
        max_steps=10,
        batch_size=2,
        log_every=1,
        eval_every=0,
        checkpoint_every=1,
        keep_checkpoints=20,
        warmup_steps=0,
        progress="off",
    )
    values.update(cfg)
    tokens = np.random.default_rng(0).integers(0, 40, 2000).astype(np.int32)
    batches = TokenBatches(tokens, 2, 8, seed=0)
    return Trainer(TrainConfig(**values), NaNInjector(lm, bad), batches, tokens[:200], tmp_path, log=lambda m: None)


def _weights(tmp_path, step):
    return load_file(str(tmp_path / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_leaves_weights_untouched_and_counts(tmp_path):
    trainer = _trainer(tmp_path, {3: "loss", 6: "grad"})
    result = trainer.fit()
    assert result.step == 10 and result.skipped_steps == 2 and result.rollbacks == 0
    assert _same(_weights(tmp_path, 2), _weights(tmp_path, 3))  # NaN loss: no update
    assert _same(_weights(tmp_path, 5), _weights(tmp_path, 6))  # NaN gradient only: no update either
    assert not _same(_weights(tmp_path, 3), _weights(tmp_path, 4))  # the next finite batch updates again
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert records[3]["loss"] == "nan" and records[3]["skipped_steps"] == 1
    assert records[6]["grad_norm"] == "nan" and records[6]["skipped_steps"] == 2
    assert all(np.isfinite(records[s]["loss"]) for s in (1, 2, 4, 5, 7, 10))


def test_skip_rolls_back_after_max_consecutive_skips_and_goes_on_with_the_next_data(tmp_path):
    # checkpoints every 4 steps; training calls 6 and 7 are NaN -> 2 consecutive skips -> roll back to step 4
    trainer = _trainer(tmp_path, {6: "loss", 7: "loss"}, checkpoint_every=4, max_consecutive_skips=2)
    result = trainer.fit()
    assert result.rollbacks == 1 and result.skipped_steps == 2 and result.step == 10
    # 7 calls before the roll-back, then steps 5..10 again: 13 batches consumed, none re-used
    assert trainer.model.calls == 13
    assert trainer.batches.state_dict()["index"] == 13 * 2
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "rollback"]
    assert events == [{"step": 4, "event": "rollback", "skipped_steps": 2}]


def test_rollback_policy_rolls_back_at_once(tmp_path):
    trainer = _trainer(tmp_path, {3: "loss"}, nonfinite="rollback", checkpoint_every=2)
    result = trainer.fit()
    assert result.rollbacks == 1 and result.skipped_steps == 1 and result.step == 10
    assert trainer.model.calls == 11  # call 3 failed at step 3; rolled back to step 2, steps 3..10 again


def test_raise_policy_stops_with_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, {2: "grad"}, nonfinite="raise")
    with pytest.raises(MoekitError, match=r"non-finite .* at step 2 \(train.nonfinite = 'raise'\)"):
        trainer.fit()


def test_endless_divergence_is_stopped(tmp_path):
    trainer = _trainer(tmp_path, {i: "loss" for i in range(1, 100)}, nonfinite="rollback", max_steps=50)
    with pytest.raises(MoekitError, match="rolled back 10 times"):
        trainer.fit()
