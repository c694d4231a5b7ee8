"""The non-finite policy (GLaM): skip the update of a NaN/Inf batch, roll back after repeated skips, or
raise."""

from __future__ import annotations

import hashlib
import json

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


# -- issue 18: the skip streak survives a resume; roll-backs go to a healthy checkpoint ---------------------------


def _log_without_timing(tmp_path) -> list[dict]:
    """The metrics log without the wall-clock fields (the only ones a resume may change)."""
    return [
        {k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")}
        for r in read_metrics(tmp_path / "metrics.jsonl")
    ]


def test_a_resume_inside_a_streak_of_skipped_steps_matches_the_uninterrupted_run(tmp_path):
    # Training calls 4, 5, 6 are NaN: the third skip in a row rolls back (max_consecutive_skips = 3).
    bad = {4: "loss", 5: "loss", 6: "loss"}
    ref = _trainer(tmp_path / "ref", bad, max_consecutive_skips=3)
    ref_result = ref.fit()
    assert ref_result.rollbacks == 1 and ref_result.skipped_steps == 3 and ref_result.step == 10
    ref_log = _log_without_timing(tmp_path / "ref")
    assert [r for r in ref_log if r.get("event")] == [{"step": 5, "event": "rollback", "skipped_steps": 3}]

    # The same run dies in training call 6, after the checkpoint of step 5 (two skips into the streak).
    crashed = _trainer(tmp_path / "b", bad, max_consecutive_skips=3)
    real_forward = crashed.model.forward

    def die_at_call_6(inputs, targets):
        if crashed.model.training and crashed.model.calls == 5:
            raise RuntimeError("killed")
        return real_forward(inputs, targets)

    crashed.model.forward = die_at_call_6
    with pytest.raises(RuntimeError, match="killed"):
        crashed.fit()
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["consecutive_skips"] == 2 and state["skipped_steps"] == 2

    resumed = _trainer(tmp_path / "b", bad, max_consecutive_skips=3)
    assert resumed.resume() and resumed.step == 5 and resumed.consecutive_skips == 2
    resumed.model.calls = resumed.batches.state_dict()["index"] // 2  # the calls so far: one batch each
    result = resumed.fit()
    # The third skip after the resume rolls back, as in the uninterrupted run (it did not before: the streak
    # restarted at 0, step 6 was skipped once more and the run went on from there).
    assert (result.rollbacks, result.skipped_steps, result.step) == (1, 3, 10)
    assert _log_without_timing(tmp_path / "b") == ref_log
    assert _same(_weights(tmp_path / "b", 10), _weights(tmp_path / "ref", 10))


def test_a_checkpoint_written_before_the_streak_counter_existed_resumes_with_no_streak(tmp_path):
    trainer = _trainer(tmp_path, {}, max_steps=2)
    trainer.fit()
    path = tmp_path / "checkpoints" / "step_00000002"
    state = json.loads((path / "state.json").read_text())
    del state["consecutive_skips"]
    _rewrite_state(path, state)
    resumed = _trainer(tmp_path, {}, max_steps=2)
    resumed.consecutive_skips = 7
    assert resumed.resume() and resumed.consecutive_skips == 0


def _rewrite_state(path, state) -> None:
    """Replace a checkpoint's state.json and fix its manifest (as an older moekit would have written it)."""
    raw = json.dumps(state).encode()
    (path / "state.json").write_bytes(raw)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _poison_weights_at_call(trainer: Trainer, call: int) -> None:
    """After the optimizer update of training call ``call``, one weight becomes NaN (an update that overflowed):
    the loss and gradient of that step were finite, every later one is not."""
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if trainer.model.calls == call:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")
        return out

    trainer.optimizer.step = step


@pytest.mark.parametrize(
    ("eval_every", "keep", "why"),
    [
        (2, 20, "validation loss nan at step 4"),  # the NaN validation loss is logged at the poisoned step
        (0, 20, "non-finite weights"),  # no validation at that step: the weights themselves are checked
        (2, 2, "validation loss nan at step 6"),  # keep-last-2 holds only unhealthy ones: the healthy one stays
    ],
)
def test_rollback_skips_unhealthy_checkpoints_and_goes_to_the_newest_healthy_one(tmp_path, eval_every, keep, why):
    # Call 4's update makes a weight NaN; steps 5, 6, 7 are then non-finite; the third skip rolls back. The
    # checkpoints of steps 4 and 6 hold the NaN weight: the roll-back must go to step 2.
    trainer = _trainer(tmp_path, {}, checkpoint_every=2, eval_every=eval_every, keep_checkpoints=keep)
    logged: list[str] = []
    trainer.log = logged.append
    _poison_weights_at_call(trainer, 4)
    # Before: it rolled back to step 6 (the NaN weight), skipped every later step and "finished" with NaN weights
    # (a longer run died after 10 roll-backs).
    result = trainer.fit()
    assert (result.rollbacks, result.skipped_steps, result.step) == (1, 3, 10)
    assert np.isfinite(result.final_val_loss)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "rollback"]
    assert events == [{"step": 2, "event": "rollback", "skipped_steps": 3}]
    skipped = [m for m in logged if m.startswith("not rolling back to")]
    assert len(skipped) == 2 and "step_00000006" in skipped[0] and "step_00000004" in skipped[1]
    assert why in skipped[0 if keep == 2 else 1]
    assert any("rolled back to step_00000002 (step 2)" in m for m in logged)
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000010" / "manifest.json").read_text())
    assert manifest["healthy"] is True


def test_rollback_with_no_healthy_checkpoint_is_one_clear_error(tmp_path):
    trainer = _trainer(tmp_path, {}, nonfinite="rollback")
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")  # non-finite from the start: step 0 too
    with pytest.raises(MoekitError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message
    assert "at step 1, and no checkpoint in" in message and "is healthy to roll back to" in message
    assert trainer.rollbacks == 1  # before: back to the NaN step 0 again and again, "rolled back 10 times"
