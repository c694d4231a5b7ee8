"""The trainer on a ``("dp", "ep")`` device mesh of 4 gloo ranks equals the single-process trainer.

(dp 2, ep 2), (dp 4, ep 1) and (dp 1, ep 4), with the non-expert weights replicated or FSDP2-sharded: the same
per-step losses, gradient norms and routing counts as one
process on the same global batches, and the same weights at the end (the mesh's sharded checkpoint read back into
the single-process layout). Routing groups of one sequence (``group_size = seq_len``) make capacity and drops
independent of how the batch is split over ranks, and no jitter removes the only random draw, so the runs can match
to rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.data.batches import TokenBatches
from moekit.models import LMConfig, TransformerLM
from moekit.training.config import TrainConfig
from moekit.training.distributed import ExpertParallel, init_parallel_mesh
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer
from tests.distributed._checkpoints import checkpoint_weights
from tests.distributed._launch import spawn

SEQ, BATCH, STEPS, VOCAB = 16, 8, 6, 64


def _model() -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=64, num_experts=4, top_k=2, capacity_factor=1.0, group_size=SEQ,
                    jitter_eps=0.0)
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=SEQ, moe=moe,
                   moe_every=2, moe_offset=1)
    return TransformerLM(cfg)


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=4000).astype(np.int32)


def _train(run_dir: Path, parallel_of=None) -> None:
    model = _model()
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                         checkpoint_every=STEPS, threads=1, progress="off", seed=0)
    tokens = _tokens()
    parallel = parallel_of(model) if parallel_of else None
    trainer = Trainer(config, model, TokenBatches(tokens, BATCH, SEQ, 0), None, run_dir, log=lambda m: None,
                      parallel=parallel)
    trainer.fit()


def _mesh_run(rank: int, world: int, dp: int, ep: int, fsdp: bool, run_dir: str) -> None:
    mesh = init_parallel_mesh(dp, ep, timeout_s=60)
    assert mesh.mesh_dim_names == ("dp", "ep") and tuple(mesh.shape) == (dp, ep)
    held = {}

    def parallel_of(model):
        held["model"] = model
        return ExpertParallel.from_mesh(model, mesh, fsdp=fsdp)

    _train(Path(run_dir), parallel_of)
    # What this rank holds at the end: each parameter's local element count and whether it is an FSDP shard.
    local = {n: [p.to_local().numel() if hasattr(p, "to_local") else p.numel(), hasattr(p, "to_local")]
             for n, p in held["model"].named_parameters()}
    (Path(run_dir) / f"held_rank{rank}.json").write_text(json.dumps(local))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    _train(run_dir)
    return run_dir


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("dp,ep,fsdp", [
    (2, 2, False), (4, 1, False), (1, 4, False), (2, 2, True), (4, 1, True), (1, 4, True),
], ids=["2-2-replicated", "4-1-replicated", "1-4-replicated", "2-2-fsdp", "4-1-fsdp", "1-4-fsdp"])
def test_mesh_training_equals_one_process(reference, tmp_path, dp, ep, fsdp):
    spawn(_mesh_run, dp * ep, dp, ep, fsdp, str(tmp_path))
    ref, got = _records(reference), _records(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, r in ref.items():
        assert got[step]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4, abs=1e-6), step
        # The routing counts are the whole batch's (summed over every rank), not one rank's share.
        assert got[step]["tokens_per_expert"] == r["tokens_per_expert"], step
        assert sum(map(sum, r["tokens_per_expert"])) > 0
    name = f"checkpoints/step_{STEPS:08d}"
    w_ref, w = checkpoint_weights(reference / name), checkpoint_weights(tmp_path / name)
    assert w.keys() == w_ref.keys()
    for key in w_ref:
        torch.testing.assert_close(w[key], w_ref[key], rtol=1e-4, atol=1e-5)
    state = json.loads((tmp_path / name / "state.json").read_text())
    assert len(state["rng_per_rank"]) == dp * ep
    # What each rank held: the experts' E / ep rows; with FSDP every other weight as a DTensor shard, the 4 shards
    # adding up to the whole parameter; without it, whole replicas.
    full = {n: p.numel() for n, p in _model().named_parameters()}
    held = [json.loads((tmp_path / f"held_rank{r}.json").read_text()) for r in range(dp * ep)]
    for n, numel in full.items():
        if ".experts." in n:
            assert all(h[n] == [numel // ep, False] for h in held), n
        elif fsdp:
            assert all(h[n][1] for h in held) and sum(h[n][0] for h in held) == numel, n
            assert max(h[n][0] for h in held) <= -(-numel // 4) * 2, n  # about 1 / world each (dim-0 chunks)
        else:
            assert all(h[n] == [numel, False] for h in held), n
