"""SIGTERM and SIGINT stop ``moekit train`` cleanly (issue 18): the step in progress finishes, a checkpoint of that
step is written, the command says where and how to resume and exits with 128 + the signal's number; the resumed
run's losses equal those of a run never stopped, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_config_text, write_tiny_corpus

from moekit.lab.cli import main
from moekit.lab.training import run as run_module
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config
from moekit.training import checkpoint as ckpt
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer

MAX_STEPS = 24


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The config file and the per-step losses of the run never stopped."""
    tmp = tmp_path_factory.mktemp("stop")
    cfg = tmp / "tiny.toml"
    cfg.write_text(tiny_config_text(write_tiny_corpus(tmp / "corpus.txt"), max_steps=MAX_STEPS, checkpoint_every=8,
                                    eval_every=8))
    # One thread, as `moekit train` sets for this config (train.threads = 1): this module-scoped fixture runs
    # before the per-test one that sets it, and another thread count reduces floats in another order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(load_run_config(cfg), tmp / "ref", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    losses = _losses(tmp / "ref")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return cfg, losses


# `moekit train`, but each step sleeps a little, so that the run cannot finish before the test's signal reaches it,
# and the first step leaves a marker file (the metrics log is only flushed at checkpoints). The numbers are those of
# plain `moekit train`.
SLOW_TRAIN = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from moekit.training.trainer import Trainer
    real = Trainer._train_step
    def slow(self, inputs, targets):
        time.sleep(0.1)
        out = real(self, inputs, targets)
        Path(os.environ["FIRST_STEP_MARKER"]).touch()
        return out
    Trainer._train_step = slow
    from moekit.lab.cli import main
    sys.exit(main(sys.argv[1:]))
""")

STOPPED = re.compile(r"moekit train: stopped by (\w+) at step (\d+); checkpoint: (\S+)\nresume with: moekit train "
                     r"--resume (\S+)\n")


def test_sigterm_saves_a_checkpoint_says_how_to_resume_exits_143_and_the_resume_is_bit_exact(tmp_path, reference):
    cfg, ref = reference
    run_dir = tmp_path / "run"
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    marker = tmp_path / "first-step-done"
    proc = subprocess.Popen(
        [sys.executable, str(script), "train", "--config", str(cfg), "--run-dir", str(run_dir)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "FIRST_STEP_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not marker.exists():  # until the first step is done
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    found = STOPPED.search(err)
    assert found is not None, err
    name, step, checkpoint, resume_dir = found.group(1), int(found.group(2)), Path(found.group(3)), found.group(4)
    assert name == "SIGTERM" and 1 <= step < MAX_STEPS and resume_dir == str(run_dir)
    assert checkpoint == run_dir / "checkpoints" / f"step_{step:08d}"
    assert json.loads(ckpt.verify_checkpoint(checkpoint)["state.json"])["step"] == step
    # the log ends at that step, nothing was summarised (the run is not finished), and the lock is free
    assert max(_losses(run_dir)) == step and not (run_dir / "summary.json").exists()
    assert "run directory:" not in out
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert _losses(run_dir) == ref
    assert len(read_metrics(run_dir / "metrics.jsonl")) == MAX_STEPS


def _signal_during_step(monkeypatch, signum: int, step: int) -> None:
    """The process signals itself in the middle of training step ``step`` (as a scheduler or Ctrl-C would)."""
    real = Trainer._train_step

    def step_with_signal(self, inputs, targets):
        if self.step == step - 1:
            os.kill(os.getpid(), signum)
        return real(self, inputs, targets)

    monkeypatch.setattr(Trainer, "_train_step", step_with_signal)


def test_sigint_finishes_the_step_saves_it_exits_130_and_restores_the_handlers(tmp_path, reference, monkeypatch,
                                                                              capsys):
    cfg, ref = reference
    run_dir = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _signal_during_step(monkeypatch, signal.SIGINT, 3)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 130
    err = capsys.readouterr().err
    checkpoint = run_dir / "checkpoints" / "step_00000003"  # not on the every-8-steps grid: written for the stop
    assert f"stopped by SIGINT at step 3; checkpoint: {checkpoint}\nresume with: moekit train --resume {run_dir}" in err
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_00000003", "step_00000000"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert _losses(run_dir) == ref


def test_a_signal_before_training_began_stops_at_once_and_leaves_nothing(tmp_path, reference, monkeypatch, capsys):
    cfg, _ = reference
    run_dir = tmp_path / "run"
    real = run_module._prepare

    def prepare_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # while the data is prepared: no trainer to save anything yet
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "_prepare", prepare_then_signal)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moekit train: stopped by SIGTERM before training began; nothing new was saved in {run_dir}"]
    assert not run_dir.exists()


def test_a_second_signal_while_the_stop_checkpoint_is_written_stops_at_once(tmp_path, reference, monkeypatch,
                                                                            capsys):
    cfg, _ = reference
    run_dir = tmp_path / "run"
    _signal_during_step(monkeypatch, signal.SIGTERM, 3)
    real_write = ckpt._write_bytes

    def write(path: Path, data: bytes) -> None:
        real_write(path, data)
        if "step_00000003" in path.parent.name:
            os.kill(os.getpid(), signal.SIGTERM)  # impatient: the first checkpoint file is on disk

    monkeypatch.setattr(ckpt, "_write_bytes", write)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 143
    err = capsys.readouterr().err
    assert "stopped by a second SIGTERM before the checkpoint was written" in err
    # the half-written checkpoint is gone; the one before it is intact
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000000"]
    assert json.loads(ckpt.verify_checkpoint(run_dir / "checkpoints" / "step_00000000")["state.json"])["step"] == 0
