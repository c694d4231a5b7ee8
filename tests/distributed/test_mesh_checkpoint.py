"""The trainer on a ``("dp", "ep")`` mesh writes sharded checkpoints, and they resume at another layout.

The tiny model and data of test_mesh_trainer.py, 6 steps, a checkpoint every 3; one spawn per layout:

- (dp 2, ep 2) trains from scratch: every checkpoint (steps 0, 3, 6) is sharded (several shard files, each written
  by its own rank, no ``model.safetensors``) and holds the trainer's whole state (data position, every rank's RNG,
  counters, the caller's extra state, the health flag); the losses equal one process's.
- (dp 1, ep 4) resumes a copy of that run whose newest checkpoint has a damaged shard: the damage is reported by
  name, the run falls back to step 3 and steps 4..6 and the final weights equal the uninterrupted single-process
  run. Then a full disk on one rank while the step-6 checkpoint is rewritten: ``CheckpointSpaceError`` on every
  rank, one line, no temporary left, the existing step 6 intact. And a roll-back at that layout: a NaN loss at step
  3 goes back past the unhealthy sharded step 2 to the healthy step 1.
- One process (no spawn) resumes another copy from step 3: it reads the shards of 4 ranks and goes on as well,
  writing single-file checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from moekit.data.batches import TokenBatches
from moekit.training import checkpoint as ckpt
from moekit.training.config import TrainConfig
from moekit.training.distributed import ExpertParallel, init_parallel_mesh
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer
from tests.distributed._checkpoints import checkpoint_weights, full_disk
from tests.distributed._launch import spawn
from tests.distributed.test_mesh_trainer import BATCH, SEQ, STEPS, _model, _tokens

EVERY = 3
EXTRA = {"config": {"note": "extra state of the caller"}}


def _trainer(run_dir: Path, log, parallel_of=None) -> Trainer:
    model = _model()
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                         checkpoint_every=EVERY, threads=1, progress="off", seed=0)
    return Trainer(config, model, TokenBatches(_tokens(), BATCH, SEQ, 0), None, run_dir, extra_state=EXTRA,
                   log=log, parallel=parallel_of(model) if parallel_of else None)


class _NaNAt(nn.Module):
    """Wraps the LM; its loss is NaN at the given training call (1-based)."""

    def __init__(self, model: nn.Module, call: int) -> None:
        super().__init__()
        self.model, self.call, self.calls = model, call, 0

    def forward(self, inputs, targets):
        out = self.model(inputs, targets)
        self.calls += 1
        if self.calls == self.call:
            out.loss = out.loss * float("nan")
        return out


def _rollback_run(run_dir: Path, mesh, log) -> dict:
    """3 steps with a checkpoint each, step 2's marked unhealthy (as a non-finite validation loss would) and a NaN
    loss at step 3 under ``nonfinite = "rollback"``: the roll-back must pass over step 2 to step 1."""
    model = _NaNAt(_model(), 3)
    config = TrainConfig(max_steps=3, batch_size=BATCH, lr=3e-3, warmup_steps=0, log_every=1, eval_every=0,
                         checkpoint_every=1, keep_checkpoints=5, nonfinite="rollback", threads=1, progress="off")
    trainer = Trainer(config, model, TokenBatches(_tokens(), BATCH, SEQ, 0), None, run_dir, log=log,
                      parallel=ExpertParallel.from_mesh(model, mesh))
    healthy = trainer._unhealthy
    trainer._unhealthy = lambda: "marked by the test" if trainer.step == 2 else healthy()
    result = trainer.fit()
    return {"rollbacks": result.rollbacks, "step": result.step}


def _worker(rank: int, world: int, dp: int, ep: int, run_dir: str, out: str, resume: bool) -> None:
    mesh = init_parallel_mesh(dp, ep, timeout_s=60)
    lines: list[str] = []
    trainer = _trainer(Path(run_dir), lines.append, lambda model: ExpertParallel.from_mesh(model, mesh))
    report: dict = {"save_s": []}
    real_save = trainer.save

    def timed_save(metrics):
        start = time.perf_counter()
        path = real_save(metrics)
        report["save_s"].append(time.perf_counter() - start)
        return path

    trainer.save = timed_save
    if resume:
        report["resumed"] = trainer.resume()
    trainer.fit()
    if resume:
        # Rank 1's shard runs out of space: every rank must learn it (none left waiting), and step 6 stays as it was.
        with full_disk() if rank == 1 else contextlib.nullcontext():
            try:
                real_save(None)
            except ckpt.CheckpointError as exc:
                report["full_disk"] = [type(exc).__name__, str(exc)]
        report["rollback"] = _rollback_run(Path(run_dir).parent / "rollback1x4", mesh, lines.append)
    report["log"] = lines
    (Path(out) / f"{dp}x{ep}_rank{rank}.json").write_text(json.dumps(report))


def _flip_byte(path: Path) -> None:
    """Flip one byte of the tensor data (past the header): still a valid safetensors file, with wrong contents."""
    raw = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[header + (len(raw) - header) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mesh_ckpt")
    out = tmp / "out"
    out.mkdir()
    torch.set_num_threads(1)
    ref = tmp / "ref"
    _trainer(ref, lambda m: None).fit()
    mesh = tmp / "mesh2x2"
    spawn(_worker, 4, 2, 2, str(mesh), str(out), False)

    # (1, 4): the newest checkpoint damaged, so the resume falls back to step 3.
    resumed = tmp / "resume1x4"
    shutil.copytree(mesh, resumed)
    damaged = sorted((resumed / "checkpoints" / f"step_{STEPS:08d}").glob("*.safetensors"))[-1]
    _flip_byte(damaged)
    spawn(_worker, 4, 1, 4, str(resumed), str(out), True)
    listing = sorted(p.name for p in (resumed / "checkpoints").iterdir())  # after the full disk

    # One process, from step 3.
    single = tmp / "resume1"
    shutil.copytree(mesh, single)
    shutil.rmtree(single / "checkpoints" / f"step_{STEPS:08d}")
    lines: list[str] = []
    trainer = _trainer(single, lines.append)
    assert trainer.resume()
    trainer.fit()
    reports = {layout: [json.loads((out / f"{layout}_rank{r}.json").read_text()) for r in range(4)]
               for layout in ("2x2", "1x4")}
    return {"ref": ref, "mesh": mesh, "resumed": resumed, "damaged": damaged, "single": single,
            "single_log": lines, "reports": reports, "listing": listing}


def _losses(run_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps  # the resume cut the log back: no step twice
    return {r["step"]: r["loss"] for r in records}


def test_mesh_checkpoints_are_sharded_and_hold_the_whole_state(runs):
    root, ref_root = runs["mesh"] / "checkpoints", runs["ref"] / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000006", "step_00000003", "step_00000000"]
    for step in (EVERY, STEPS):
        path = root / f"step_{step:08d}"
        names = sorted(p.name for p in path.iterdir())
        shards = [n for n in names if n.endswith(".safetensors")]
        assert "model.safetensors" not in names and "optimizer.safetensors" not in names
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["format"] == "moekit-sharded-checkpoint-1" and manifest["healthy"] is True
        assert manifest["layout"] == {"world": 4, "dp": 2, "ep": 2}
        # Several ranks wrote, each its own file: nothing was gathered on rank 0.
        writers = [manifest["files"][n]["rank"] for n in shards]
        assert len(shards) >= 2 and len(set(writers)) == len(writers), writers
        state = json.loads((path / "state.json").read_text())
        ref_state = json.loads((ref_root / f"step_{step:08d}" / "state.json").read_text())
        # Everything a single-file checkpoint holds (its optimizer part is in the shards and the index).
        assert set(ref_state) <= set(state)
        assert state["step"] == step and state["config"] == EXTRA["config"] and state["data"] == ref_state["data"]
        assert len(state["rng_per_rank"]) == 4 and state["rng"] == state["rng_per_rank"][0]
        assert (state["skipped_steps"], state["consecutive_skips"], state["rollbacks"]) == (0, 0, 0)
        assert state["tokens_seen"] == ref_state["tokens_seen"] and state["metrics_bytes"] > 0
    ref, got = _losses(runs["ref"]), _losses(runs["mesh"])
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    # Every rank saved at steps 0, 3 and 6.
    assert all(len(r["save_s"]) == 3 for r in runs["reports"]["2x2"])


@pytest.mark.parametrize("layout", ["resumed", "single"])
def test_a_2x2_checkpoint_resumes_at_1x4_and_on_one_process(runs, layout):
    run_dir = runs[layout]
    ref, got = _losses(runs["ref"]), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(EVERY + 1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    w_ref, w = checkpoint_weights(runs["ref"] / "checkpoints" / final.name), checkpoint_weights(final)
    assert w.keys() == w_ref.keys()
    for name in w_ref:
        torch.testing.assert_close(w[name], w_ref[name], rtol=1e-4, atol=1e-5)
    # Each session writes its own format: sharded at (1, 4), one file on one process.
    manifest = json.loads((final / "manifest.json").read_text())
    if layout == "resumed":
        assert manifest["layout"] == {"world": 4, "dp": 1, "ep": 4}
    else:
        assert manifest["format"] == "moekit-checkpoint-1" and (final / "model.safetensors").exists()
        assert runs["single_log"][-1] == f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} (step 3)"


def test_a_damaged_shard_of_the_newest_checkpoint_falls_back_to_the_previous_one(runs):
    reports = runs["reports"]["1x4"]
    assert all(r["resumed"] for r in reports)
    log = reports[0]["log"]  # rank 0 logs for the run
    assert runs["damaged"].name in log[0] and "fails its sha256 checksum" in log[0]
    assert "trying the previous checkpoint" in log[0]
    assert log[1] == f"resumed from {runs['resumed'] / 'checkpoints' / 'step_00000003'} (step 3)"
    assert all(r["log"] == [] for r in reports[1:])


def test_a_full_disk_on_one_rank_is_one_line_on_every_rank_and_leaves_the_checkpoints_intact(runs):
    messages = [r["full_disk"] for r in runs["reports"]["1x4"]]
    for kind, message in messages:
        assert kind == "CheckpointSpaceError" and "\n" not in message
        assert "step_00000006: no space left on the device (rank 1:" in message
    assert len({m for _, m in messages}) == 1  # the same line on every rank
    root = runs["resumed"] / "checkpoints"
    assert runs["listing"] == ["step_00000000", "step_00000003", "step_00000006"]  # no temporary left
    # The existing step 6 is the one the run wrote, intact.
    assert ckpt.verify_checkpoint(root / "step_00000006").sharded


def test_a_rollback_at_1x4_goes_to_the_newest_healthy_sharded_checkpoint(runs):
    reports = runs["reports"]["1x4"]
    assert all(r["rollback"] == {"rollbacks": 1, "step": 3} for r in reports)  # every rank rolled back together
    root = runs["resumed"].parent / "rollback1x4" / "checkpoints"
    log = reports[0]["log"]
    assert f"not rolling back to {root / 'step_00000002'}: it is unhealthy (marked by the test); trying the " \
           "previous checkpoint" in log
    assert any(line.endswith("rolled back to step_00000001 (step 1), going on with the next data") for line in log)
    manifest = json.loads((root / "step_00000002" / "manifest.json").read_text())
    assert manifest["format"] == "moekit-sharded-checkpoint-1" and manifest["healthy"] is False
