"""The encoder-decoder under FSDP (dp 2) trains as one process does.

Its relative position bias table belongs to each stack's first block but is read by the stack before any block
runs, so it is an FSDP unit of its own (``Seq2SeqLM.fsdp_units``); without that the stack would read a shard. Dropless
top-1 without jitter and without the balance loss: the per-rank routing groups then route every token as one process
does, and the losses agree to float rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny_lm import write_tiny_corpus  # noqa: E402

from moekit.lab.training.run import train_run  # noqa: E402
from moekit.lab.training.run_config import load_run_config  # noqa: E402
from moekit.training.metrics import read_metrics  # noqa: E402
from tests.distributed._checkpoints import checkpoint_weights  # noqa: E402
from tests.distributed._launch import spawn  # noqa: E402
from tests.lab.training.test_seq2seq_task import _config  # noqa: E402

STEPS = 4
# The balance loss is a product of per-group means, so each rank's (over its own tokens) is not one process's; with
# it off the loss is a mean over tokens, which the ranks' shares add up to exactly.
SAME_ROUTING = ["moe.jitter_eps=0.0", "moe.capacity_factor=None", "model.load_balance_coef=0.0"]


def _run(rank: int, world: int, cfg: str, run_dir: str) -> None:
    config = load_run_config(cfg, [*SAME_ROUTING, "parallel.data_parallel=2", "parallel.fsdp=true"])
    train_run(config, Path(run_dir), log=lambda m: None)


def test_seq2seq_with_fsdp_equals_one_process(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = _config(tmp_path, corpus, max_steps=STEPS, eval_every=STEPS, checkpoint_every=STEPS, threads=1,
                  progress='"off"')
    torch.set_num_threads(1)
    train_run(load_run_config(cfg, SAME_ROUTING), tmp_path / "ref", log=lambda m: None)
    spawn(_run, 2, str(cfg), str(tmp_path / "fsdp"))
    ref, got = ({r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "loss" in r}
                for d in (tmp_path / "ref", tmp_path / "fsdp"))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, r in ref.items():
        assert got[step]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), step
    assert got[STEPS]["val_loss"] == pytest.approx(ref[STEPS]["val_loss"], rel=1e-5, abs=1e-6)
    name = f"checkpoints/step_{STEPS:08d}"
    w_ref, w = checkpoint_weights(tmp_path / "ref" / name), checkpoint_weights(tmp_path / "fsdp" / name)
    assert w.keys() == w_ref.keys()
    for key in w_ref:
        torch.testing.assert_close(w[key], w_ref[key], rtol=1e-4, atol=1e-5)
