"""A rank that dies or hangs makes the others exit with a clear error within the process-group timeout."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny_lm import tiny_config_text, write_tiny_corpus  # noqa: E402

from moekit.errors import MoekitError  # noqa: E402
from tests.distributed._launch import context, free_port  # noqa: E402

TIMEOUT_S = 3


def _worker(rank: int, port: int, mode: str, layout: list[str], cfg: str, run_dir: str, report: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S)
    )
    if rank == 1:
        if mode == "dies":
            os._exit(1)
        time.sleep(60)  # hangs; the parent ends it
        return
    from moekit.lab.training.run import train_run
    from moekit.lab.training.run_config import load_run_config

    config = load_run_config(cfg, [*layout, f"parallel.timeout_s={TIMEOUT_S}"])
    try:
        train_run(config, Path(run_dir), log=lambda m: None)
        Path(report).write_text("finished")
    except MoekitError as exc:
        Path(report).write_text(str(exc))


@pytest.mark.parametrize("mode,layout", [
    ("dies", ["parallel.expert_parallel=2"]),
    ("hangs", ["parallel.expert_parallel=2"]),
    ("dies", ["parallel.data_parallel=2", "parallel.fsdp=true"]),
], ids=["ep2-dies", "ep2-hangs", "dp2-fsdp-dies"])
def test_rank_failure_is_a_clear_error_within_the_timeout(tmp_path, mode, layout):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=4, batch_size=4))
    report = tmp_path / "report.txt"
    ctx = context()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, mode, layout, str(cfg), str(tmp_path / "run"), str(report)))
        for r in range(2)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    procs[0].join(timeout=60)
    elapsed = time.perf_counter() - t0
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert report.exists(), "rank 0 neither finished nor reported an error"
    text = report.read_text()
    assert "another rank probably died or hangs" in text and f"parallel.timeout_s = {TIMEOUT_S}" in text
    assert elapsed < 45
