"""A stop request under expert parallelism (issue 18): asked on one rank only (a signal that reached one process),
every rank stops after the same step and the checkpoint of that step holds the whole run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny_lm import tiny_config_text, write_tiny_corpus  # noqa: E402

from moekit.lab.training.run import train_run  # noqa: E402
from moekit.lab.training.run_config import load_run_config  # noqa: E402
from moekit.training import checkpoint as ckpt  # noqa: E402
from moekit.training.metrics import read_metrics  # noqa: E402
from moekit.training.trainer import Trainer  # noqa: E402
from tests.distributed._launch import spawn  # noqa: E402


class _OneRankStops:
    """What a stop signal does through moekit.lab.training.run.StopSignals: request_stop on the trainer it holds.
    Here only on rank 1, during step 3."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def attach(self, trainer: Trainer) -> None:
        real = trainer._train_step

        def step(inputs: torch.Tensor, targets: torch.Tensor):
            if self.rank == 1 and trainer.step == 2:
                trainer.request_stop()
            return real(inputs, targets)

        trainer._train_step = step


def _train(rank: int, world: int, cfg: str, run_dir: str, out: str) -> None:
    config = load_run_config(cfg, ["moe.group_size=16", "moe.jitter_eps=0.0", f"parallel.expert_parallel={world}"])
    summary = train_run(config, Path(run_dir), log=lambda m: None, stop=_OneRankStops(rank))
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))


def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(write_tiny_corpus(tmp_path / "corpus.txt", sentences=600), max_steps=10,
                                    checkpoint_every=5, eval_every=10))
    run_dir = tmp_path / "ep2"
    spawn(_train, 2, str(cfg), str(run_dir), str(tmp_path))
    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["steps"] for s in summaries] == [3, 3]
    checkpoint = run_dir / "checkpoints" / "step_00000003"
    assert [s["stopped_at"] for s in summaries] == [str(checkpoint)] * 2
    state = json.loads(ckpt.verify_checkpoint(checkpoint)["state.json"])
    assert state["step"] == 3 and len(state["rng_per_rank"]) == 2
    assert max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl")) == 3
    assert not (run_dir / "summary.json").exists()
