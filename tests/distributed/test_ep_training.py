"""Expert-parallel training on gloo equals the single-process run, and its checkpoints reshard.

- 10 steps at EP = 2: the same per-step losses as one process on the same global batches, the same final weights;
- the EP = 2 checkpoint of step 5 resumed at EP = 1 and at EP = 4: steps 6..10 continue identically.

Routing groups of one sequence (``moe.group_size = seq_len``) make the capacity and drops independent of how the
batch is split over ranks, and ``jitter_eps = 0`` removes the only random draw, so the runs can match exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny_lm import tiny_config_text, write_tiny_corpus  # noqa: E402

from moekit.lab.training.run import read_run_config, train_run  # noqa: E402
from moekit.lab.training.run_config import layout_for_launch, load_run_config  # noqa: E402
from moekit.training.metrics import read_metrics  # noqa: E402
from tests.distributed._checkpoints import checkpoint_weights  # noqa: E402
from tests.distributed._launch import spawn  # noqa: E402

OVERRIDES = ["moe.group_size=16", "moe.jitter_eps=0.0"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _train(rank: int, world: int, cfg: str, run_dir: str) -> None:
    config = load_run_config(cfg, [*OVERRIDES, f"parallel.expert_parallel={world}"])
    train_run(config, Path(run_dir), log=lambda m: None)


def _resume(rank: int, world: int, run_dir: str) -> None:
    train_run(None, Path(run_dir), resume=True, log=lambda m: None)


def _resume_layout(rank: int, world: int, run_dir: str, dp: int) -> None:
    saved = read_run_config(Path(run_dir))
    layout = layout_for_launch(saved, world, data_parallel=dp)
    train_run(dataclasses.replace(saved, parallel=layout), Path(run_dir), resume=True, log=lambda m: None)


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights of checkpoint ``step`` in the single-process layout (an EP run's checkpoints are sharded)."""
    return checkpoint_weights(run_dir / "checkpoints" / f"step_{step:08d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    corpus = write_tiny_corpus(tmp / "corpus.txt", sentences=600)
    cfg = tmp / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=10, batch_size=4, checkpoint_every=5, eval_every=10))
    ref = tmp / "ref"
    torch.set_num_threads(1)
    train_run(load_run_config(cfg, OVERRIDES), ref, log=lambda m: None)
    ep2 = tmp / "ep2"
    spawn(_train, 2, str(cfg), str(ep2))
    return tmp, ref, ep2


def test_ep2_matches_single_process(runs):
    _, ref, ep2 = runs
    ref_losses, ep_losses = _losses(ref), _losses(ep2)
    assert sorted(ep_losses) == list(range(1, 11))
    for step in ref_losses:
        assert ep_losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step
    # The routing metrics are the whole batch's, not rank 0's half: the same counts per expert (summed over the
    # ranks), drop fractions, entropy, max logit and mean gate as one process routing every row.
    keys = ("tokens_per_expert", "drop_fraction_per_layer", "router_entropy", "max_router_logit", "mean_gate")
    ref_m = {r["step"]: r for r in read_metrics(ref / "metrics.jsonl") if "loss" in r}
    ep_m = {r["step"]: r for r in read_metrics(ep2 / "metrics.jsonl") if "loss" in r}
    for step, r in ref_m.items():
        assert ep_m[step]["tokens_per_expert"] == r["tokens_per_expert"], step
        assert sum(map(sum, r["tokens_per_expert"])) > 0
        for key in keys[1:]:
            assert ep_m[step][key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (step, key)
    # The sharded checkpoint holds every expert, equal to the single-process weights.
    w_ref, w_ep = _weights(ref, 10), _weights(ep2, 10)
    assert w_ref.keys() == w_ep.keys()
    for name in w_ref:
        assert w_ep[name].shape == w_ref[name].shape, name
        torch.testing.assert_close(w_ep[name], w_ref[name], rtol=1e-4, atol=1e-5)
    # Every rank's RNG stream is in the checkpoint, in rank order.
    state = json.loads((ep2 / "checkpoints" / "step_00000010" / "state.json").read_text())
    assert len(state["rng_per_rank"]) == 2 and state["rng_per_rank"][0] == state["rng"]
    # Only rank 0 wrote files: one metrics log, no stray per-rank files.
    assert sorted(p.name for p in ep2.iterdir()) == sorted(p.name for p in ref.iterdir())


def _from_step5(ep2: Path, dest: Path) -> Path:
    shutil.copytree(ep2, dest)
    shutil.rmtree(dest / "checkpoints" / "step_00000010")
    return dest


@pytest.mark.parametrize("world", [1, 4])
def test_ep2_checkpoint_resumes_at_another_degree(runs, world):
    tmp, ref, ep2 = runs
    run_dir = _from_step5(ep2, tmp / f"resume{world}")
    if world == 1:
        train_run(None, run_dir, resume=True, log=lambda m: None)
    else:
        spawn(_resume, world, str(run_dir))
    ref_losses, losses = _losses(ref), _losses(run_dir)
    assert sorted(losses) == list(range(1, 11))
    for step in range(6, 11):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step
    w_ref, w = _weights(ref, 10), _weights(run_dir, 10)
    for name in w_ref:
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=1e-5)


def test_ep2_checkpoint_resumes_on_a_dp2_ep2_mesh(runs):
    """The EP = 2 checkpoint of step 5 resumed by 4 processes as 2 data-parallel replicas of 2 expert shards:
    steps 6..10 and the final weights are those of the single-process run."""
    tmp, ref, ep2 = runs
    run_dir = _from_step5(ep2, tmp / "resume_dp2_ep2")
    spawn(_resume_layout, 4, str(run_dir), 2)
    ref_losses, losses = _losses(ref), _losses(run_dir)
    assert sorted(losses) == list(range(1, 11))
    for step in range(6, 11):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step
    assert read_run_config(run_dir).parallel.data_parallel == 2
    w_ref, w = _weights(ref, 10), _weights(run_dir, 10)
    for name in w_ref:
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=1e-5)


def test_ep2_adafactor_update_clipping_matches_single_process(tmp_path):
    # Adafactor clips each update by the RMS of the whole [E, ...] expert stack: under expert parallelism the RMS
    # is summed over the ranks' slices (d = 0.01 makes the clipping bind at every step).
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        tiny_config_text(corpus, max_steps=4, batch_size=4, checkpoint_every=4, eval_every=4, optimizer="adafactor",
                         update_clip_d=0.01)
    )
    train_run(load_run_config(cfg, OVERRIDES), tmp_path / "one", log=lambda m: None)
    spawn(_train, 2, str(cfg), str(tmp_path / "two"))
    ref, ep = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ep) == [1, 2, 3, 4]
    for step in ref:
        assert ep[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    w_ref, w = _weights(tmp_path / "one", 4), _weights(tmp_path / "two", 4)
    for name in w_ref:
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=1e-5)
