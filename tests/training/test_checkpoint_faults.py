"""Checkpoint faults of issue 18: a full disk mid-write (one line, no partial directory, earlier checkpoints intact),
temporaries of killed writers removed before the next write, manifests that are valid JSON but lack a key or hold a
wrong type (one line naming the file, fallback to the previous checkpoint), and the health flag."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.data.batches import TokenBatches
from moekit.errors import MoekitError
from moekit.models import LMConfig, TransformerLM
from moekit.training import TrainConfig, Trainer
from moekit.training import checkpoint as ckpt


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full_disk_at(monkeypatch, step: int, name: str = "optimizer.safetensors") -> None:
    """Writing ``name`` of checkpoint ``step`` gets half its bytes onto the disk, then the disk is full."""
    real = ckpt._write_bytes

    def write(path: Path, data: bytes) -> None:
        if path.name == name and f"step_{step:08d}" in path.parent.name:
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", write)


def test_a_full_disk_mid_write_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=3)
    _full_disk_at(monkeypatch, 3)
    with pytest.raises(ckpt.CheckpointSpaceError) as info:
        ckpt.save_checkpoint(tmp_path, 3, model, opt, {}, keep=3)
    message = str(info.value)
    assert isinstance(info.value, MoekitError) and "\n" not in message
    assert str(tmp_path / "step_00000003") in message and "no space left" in message
    # no temporary, no step_3; the earlier checkpoints verify
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    for step in (1, 2):
        assert set(ckpt.verify_checkpoint(tmp_path / f"step_{step:08d}")) == {
            "model.safetensors", "optimizer.safetensors", "state.json"
        }


def test_a_full_disk_during_training_stops_in_one_line_and_a_resume_goes_on(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8))
    tokens = np.random.default_rng(0).integers(0, 40, 800).astype(np.int32)
    config = TrainConfig(max_steps=6, batch_size=2, log_every=1, eval_every=0, checkpoint_every=2, warmup_steps=0,
                         progress="off")
    trainer = Trainer(config, lm, TokenBatches(tokens, 2, 8, seed=0), None, tmp_path, log=lambda m: None)
    _full_disk_at(monkeypatch, 4, "model.safetensors")
    with pytest.raises(ckpt.CheckpointSpaceError, match=r"step_00000004: no space left on the device"):
        trainer.fit()
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000000"]
    # space freed: the run resumes from step 2 and finishes
    monkeypatch.undo()
    again = Trainer(config, lm, TokenBatches(tokens, 2, 8, seed=0), None, tmp_path, log=lambda m: None)
    assert again.resume() and again.step == 2
    assert again.fit().step == 6


def test_a_killed_writers_temporary_is_removed_before_the_next_write(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep=3)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    stale = tmp_path / f".tmp-step_00000002-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    trash = tmp_path / f".trash-step_00000001-{dead.pid}-89abcdef"
    trash.mkdir()
    # a live writer's temporary (here: the parent of this process) is not touched
    live = tmp_path / f".tmp-step_00000009-{os.getppid()}-fedcba98"
    live.mkdir()
    seen: list[list[str]] = []
    real = ckpt._write_bytes

    def write(path: Path, data: bytes) -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p != path.parent))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", write)
    ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep=3)
    # already gone when the first byte of the new checkpoint was written
    assert seen[0] == [live.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "step_00000001", "step_00000002"]


def _damage_key(manifest: dict) -> None:
    del manifest["files"]["model.safetensors"]["bytes"]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_damage_key, "files 'model.safetensors' 'bytes' is missing"),
        (lambda m: m.pop("step"), "'step' is missing"),
        (lambda m: m.pop("files"), "'files' is missing"),
        (lambda m: m.update(step="3"), "'step' is str '3', not an integer"),
        (lambda m: m.update(step=4), "'step' is 4, but the directory is step_00000003"),
        (lambda m: m.update(files=[]), "'files' is list [], not an object"),
        (lambda m: m.update(healthy="yes"), "'healthy' is str 'yes', not a boolean"),
        (lambda m: m["files"]["state.json"].update(bytes=True), "'bytes' is bool True, not an integer"),
        (lambda m: m["files"]["state.json"].update(bytes="120"), "'bytes' is str '120', not an integer"),
        (lambda m: m["files"]["optimizer.safetensors"].update(sha256=7), "'sha256' is int 7, not a string"),
        (lambda m: m["files"]["optimizer.safetensors"].update(sha256="abc"), "not 64 hexadecimal digits"),
    ],
)
def test_a_manifest_missing_a_key_or_with_a_wrong_type_is_one_line_and_the_previous_checkpoint_is_used(
    tmp_path, damage, says
):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=3)
    mpath = tmp_path / "step_00000003" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    damage(manifest)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify_checkpoint(tmp_path / "step_00000003")
    message = str(info.value)
    assert "\n" not in message and str(mpath) in message and says in message, message
    reports: list[str] = []
    path, _ = ckpt.latest_valid_checkpoint(tmp_path, report=reports.append)
    assert path.name == "step_00000002"
    assert len(reports) == 1 and str(mpath) in reports[0] and says in reports[0]


def test_a_manifest_that_is_not_an_object_is_one_line(tmp_path):
    model, opt = _model_and_opt()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep=3)
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ckpt.CheckpointError, match=r"manifest .*manifest.json is damaged \(a JSON list, not an objec"):
        ckpt.verify_checkpoint(path)


def test_health_is_recorded_and_an_old_checkpoint_without_the_flag_is_judged_by_its_weights(tmp_path):
    model, opt = _model_and_opt()
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep=5)
    told = ckpt.save_checkpoint(tmp_path, 2, model, opt, {}, keep=5, unhealthy="validation loss nan at step 2")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    nan = ckpt.save_checkpoint(tmp_path, 3, model, opt, {}, keep=5)
    flags = [json.loads((p / "manifest.json").read_text())["healthy"] for p in (good, told, nan)]
    assert flags == [True, False, False]
    reasons = [ckpt.unhealthy_reason(p, ckpt.verify_checkpoint(p)) for p in (good, told, nan)]
    assert reasons == [None, "validation loss nan at step 2", "non-finite weights"]
    # as written before the flag existed: no "healthy" key; the weights decide
    for p in (good, nan):
        manifest = json.loads((p / "manifest.json").read_text())
        manifest.pop("healthy")
        manifest.pop("unhealthy", None)
        (p / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.unhealthy_reason(good, ckpt.verify_checkpoint(good)) is None
    assert ckpt.unhealthy_reason(nan, ckpt.verify_checkpoint(nan)) == "non-finite weights"


def test_pruning_keeps_the_newest_healthy_checkpoint_when_the_kept_ones_are_all_unhealthy(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    for step in (3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=2, unhealthy="validation loss nan")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000003", "step_00000002"]
    # a healthy one among the newest two: plain keep-last-2 again
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005", "step_00000004"]
