"""Resuming reproduces the uninterrupted run bit for bit on CPU: in process, and after a real SIGKILL of a training
subprocess at an arbitrary moment and in the middle of a checkpoint write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text

from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _config(tmp_path: Path, corpus: Path, **train):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_config_text(corpus, **train))
    return path


def test_loss_decreases_and_resume_in_process_is_bit_exact(tmp_path, tiny_corpus, monkeypatch):
    cfg_path = _config(tmp_path, tiny_corpus, max_steps=40, checkpoint_every=20, eval_every=20, lr=1e-2, batch_size=16)
    ref = train_run(load_run_config(cfg_path), tmp_path / "ref", log=lambda m: None)
    losses = _losses(tmp_path / "ref")
    assert len(losses) == 40
    # learns: the last steps are well below the first (ln 300 = 5.70 at init)
    assert abs(losses[1] - 5.70) < 0.3
    assert sum(losses[i] for i in range(36, 41)) / 5 < losses[1] - 1.5
    assert ref["final_val_loss"] < ref["unigram_val_loss"]
    # a second run that crashes in step 26 (5 steps after its step-20 checkpoint), resumed, gives the same
    # losses bit for bit, and its metrics log holds each step once
    real_step = Trainer._train_step

    def crash_at_26(self, inputs, targets):
        if self.step == 25:
            raise RuntimeError("crash")
        return real_step(self, inputs, targets)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_26)
    with pytest.raises(RuntimeError, match="crash"):
        train_run(load_run_config(cfg_path), tmp_path / "b", log=lambda m: None)
    assert len(_losses(tmp_path / "b")) == 25
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    train_run(load_run_config(cfg_path), tmp_path / "b", resume=True, log=lambda m: None)
    assert _losses(tmp_path / "b") == losses
    assert len(read_metrics(tmp_path / "b" / "metrics.jsonl")) == 40


KILL_IN_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import moekit.training.checkpoint as ckpt
    real = ckpt._write_bytes
    def write_then_die(path, data):
        real(path, data)
        # SIGKILL right after the model file of step 20 is on disk, before the manifest: a half-written checkpoint
        if path.name == "model.safetensors" and "step_00000020" in str(path.parent):
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt._write_bytes = write_then_die
    from moekit.lab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_at_any_moment_and_during_a_checkpoint_write_then_resume_is_bit_exact(tmp_path, tiny_corpus):
    cfg_path = _config(tmp_path, tiny_corpus, max_steps=200, checkpoint_every=10, eval_every=50)
    train_run(load_run_config(cfg_path), tmp_path / "ref", log=lambda m: None)
    ref = _losses(tmp_path / "ref")
    assert len(ref) == 200
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # 1. an external SIGKILL at an arbitrary moment (once the run is a few dozen steps in)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moekit", "train", "--config", str(cfg_path), "--run-dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 37:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the training subprocess finished before it could be killed"
    partial = _losses(killed)
    assert 0 < len(partial) < 200

    # 2. a SIGKILL in the middle of writing the step-20 checkpoint
    torn = tmp_path / "torn"
    script = tmp_path / "kill_in_checkpoint.py"
    script.write_text(KILL_IN_CHECKPOINT)
    rc = subprocess.run(
        [sys.executable, str(script), "train", "--config", str(cfg_path), "--run-dir", str(torn)],
        env=env,
        capture_output=True,
    ).returncode
    assert rc == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-step_00000020") for p in (torn / "checkpoints").iterdir())
    assert not (torn / "checkpoints" / "step_00000020").exists()

    for run_dir in (killed, torn):
        messages: list[str] = []
        train_run(load_run_config(cfg_path), run_dir, resume=True, log=messages.append)
        assert _losses(run_dir) == ref
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 200
    assert any("partial checkpoint" in m for m in messages)
    assert any("resumed from" in m and "step_00000010" in m for m in messages)
