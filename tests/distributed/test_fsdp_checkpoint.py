"""FSDP2 runs checkpoint and resume like the others, and a rank killed mid-checkpoint loses nothing committed.

The tiny model and data of test_mesh_trainer.py, 6 steps, a checkpoint every 3 (every 2 in the kill test):

- (dp 2, ep 2) with FSDP trains from scratch; its sharded checkpoints hold FSDP's DTensor shards as plain full
  tensors. A copy resumes from step 3 at (dp 4, ep 1), FSDP again (other shard boundaries), and another copy on one
  process: steps 4..6 and the final weights equal the uninterrupted single-process run.
- A single-process (single-file) checkpoint resumes at (dp 1, ep 4) with FSDP: it is loaded before FSDP cuts its
  shards, and the loaded Adam state is cut with the weights. After that run, the same file loads again into the
  already-sharded model (as a roll-back to it would): every rank keeps its part of each full tensor.
- (dp 2, ep 1) with FSDP, rank 1 SIGKILLed while it hashes its shard of the step-4 checkpoint: rank 0 ends with an
  error within ``parallel.timeout_s``, no step-4 checkpoint exists, and one process resumes from step 2 to the same
  losses and weights as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moekit.data.batches import TokenBatches
from moekit.training import checkpoint as ckpt
from moekit.training import sharded_checkpoint
from moekit.training.config import TrainConfig
from moekit.training.distributed import ExpertParallel, init_parallel_mesh
from moekit.training.trainer import Trainer
from tests.distributed._checkpoints import checkpoint_weights
from tests.distributed._launch import context, free_port, spawn
from tests.distributed.test_mesh_checkpoint import _losses, _trainer
from tests.distributed.test_mesh_trainer import BATCH, SEQ, STEPS, _model, _tokens

KILL_TIMEOUT_S = 5


def _fsdp_worker(rank: int, world: int, dp: int, ep: int, run_dir: str, resume: bool, reload: str | None) -> None:
    mesh = init_parallel_mesh(dp, ep, timeout_s=60)
    trainer = _trainer(Path(run_dir), lambda m: None, lambda model: ExpertParallel.from_mesh(model, mesh, fsdp=True))
    if resume:
        assert trainer.resume()
    trainer.fit()
    if reload is None:
        return
    # Load a single-file checkpoint into the model FSDP has already cut, then report the whole weights.
    trainer._load(ckpt.verify_checkpoint(Path(reload), trainer.parallel))
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach() for n, t in
            trainer.model.state_dict().items()}
    experts = {n for n in full if ".experts." in n}
    # The experts stay sliced over ep: gather them as the checkpoint reader would (each rank's E / ep rows).
    for n in sorted(experts):
        parts = [torch.empty_like(full[n]) for _ in range(ep)]
        dist.all_gather(parts, full[n].contiguous(), group=trainer.parallel.ep_group)
        full[n] = torch.cat(parts)
    if rank == 0:
        torch.save(full, Path(run_dir) / "reloaded.pt")


def _kill_worker(rank: int, port: int, run_dir: str, report: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=KILL_TIMEOUT_S))
    if rank == 1:
        digest = sharded_checkpoint._file_digest

        def killed_at_step_4(path: Path):
            if ".tmp-step_00000004" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)  # its shard is written, the commit has not happened
            return digest(path)

        sharded_checkpoint._file_digest = killed_at_step_4
    mesh = init_parallel_mesh(2, 1, timeout_s=KILL_TIMEOUT_S)
    model = _model()
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                         checkpoint_every=2, threads=1, progress="off", seed=0)
    trainer = Trainer(config, model, TokenBatches(_tokens(), BATCH, SEQ, 0), None, Path(run_dir), log=lambda m: None,
                      parallel=ExpertParallel.from_mesh(model, mesh, fsdp=True))
    t0 = time.perf_counter()
    try:
        trainer.fit()
        outcome = "finished"
    except Exception as exc:  # noqa: BLE001 - the test reads what rank 0 met
        outcome = type(exc).__name__
    Path(report).write_text(json.dumps({"outcome": outcome, "step": trainer.step,
                                        "waited_s": time.perf_counter() - t0}))
    os._exit(0)  # the group is broken: no orderly teardown


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fsdp_ckpt")
    torch.set_num_threads(1)
    ref = tmp / "ref"
    _trainer(ref, lambda m: None).fit()
    mesh = tmp / "fsdp2x2"
    spawn(_fsdp_worker, 4, 2, 2, str(mesh), False, None)

    at_step_3 = {}
    for name, source in (("fsdp4x1", mesh), ("single", mesh), ("from_single_file", ref)):
        at_step_3[name] = tmp / name
        shutil.copytree(source, at_step_3[name])
        shutil.rmtree(at_step_3[name] / "checkpoints" / f"step_{STEPS:08d}")
    spawn(_fsdp_worker, 4, 4, 1, str(at_step_3["fsdp4x1"]), True, None)
    trainer = _trainer(at_step_3["single"], lambda m: None)
    assert trainer.resume()
    trainer.fit()
    reload = ref / "checkpoints" / "step_00000003"
    spawn(_fsdp_worker, 4, 1, 4, str(at_step_3["from_single_file"]), True, str(reload))
    return {"ref": ref, "mesh": mesh, **at_step_3, "reload": reload}


def _assert_same_run(run_dir: Path, ref: Path, first: int = 1) -> None:
    want, got = _losses(ref), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(first, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    name = f"checkpoints/step_{STEPS:08d}"
    w_ref, w = checkpoint_weights(ref / name), checkpoint_weights(run_dir / name)
    assert w.keys() == w_ref.keys()
    for key in w_ref:
        torch.testing.assert_close(w[key], w_ref[key], rtol=1e-4, atol=1e-5)


def test_fsdp_training_checkpoints_are_sharded_and_equal_one_process(runs):
    _assert_same_run(runs["mesh"], runs["ref"])
    final = runs["mesh"] / "checkpoints" / f"step_{STEPS:08d}"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["layout"] == {"world": 4, "dp": 2, "ep": 2}
    # FSDP's shards are written by the ranks holding them: all four ranks wrote a file.
    assert sorted(e["rank"] for n, e in manifest["files"].items() if n.endswith(".safetensors")) == [0, 1, 2, 3]
    # Adam's moments of a sharded weight are saved whole (full shape in the index).
    index = json.loads((final / "state.json").read_text())["tensors"]
    assert index["optim/embed.weight/exp_avg"]["shape"] == list(_model().embed.weight.shape)


@pytest.mark.parametrize("layout", ["fsdp4x1", "single"])
def test_an_fsdp_checkpoint_resumes_at_another_layout_and_on_one_process(runs, layout):
    _assert_same_run(runs[layout], runs["ref"], first=4)


def test_a_single_file_checkpoint_resumes_under_fsdp_and_loads_into_its_shards(runs):
    _assert_same_run(runs["from_single_file"], runs["ref"], first=4)
    reloaded = torch.load(runs["from_single_file"] / "reloaded.pt", weights_only=True)  # the test's own file
    saved = checkpoint_weights(runs["reload"])
    assert reloaded.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(reloaded[key], saved[key], rtol=0, atol=0)


def test_a_rank_killed_mid_checkpoint_leaves_the_last_committed_one_to_resume_from(runs, tmp_path):
    run_dir, report = tmp_path / "killed", tmp_path / "rank0.json"
    ctx = context()
    port = free_port()
    procs = [ctx.Process(target=_kill_worker, args=(r, port, str(run_dir), str(report))) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert procs[1].exitcode == -signal.SIGKILL
    got = json.loads(report.read_text())
    # Rank 0 did not wait forever: its collective gave up after the timeout, inside the step-4 save.
    assert got["outcome"] != "finished" and got["step"] == 4 and got["waited_s"] < 60, got
    root = run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000000"]
    # One process resumes from the last committed checkpoint and runs as if nothing had happened.
    lines: list[str] = []
    model = _model()
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                         checkpoint_every=2, threads=1, progress="off", seed=0)
    trainer = Trainer(config, model, TokenBatches(_tokens(), BATCH, SEQ, 0), None, run_dir, log=lines.append)
    assert trainer.resume()
    assert lines[-1] == f"resumed from {root / 'step_00000002'} (step 2)"
    trainer.fit()
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the killed writer's partial is gone
    _assert_same_run(run_dir, runs["ref"], first=3)
