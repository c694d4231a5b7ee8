"""``torchrun -m moekit train --set parallel.expert_parallel=2`` end to end, then ``--resume`` in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from tiny_lm import tiny_config_text, write_tiny_corpus  # noqa: E402

from moekit.lab.cli import main  # noqa: E402


def test_torchrun_train_then_resume_with_one_process(tmp_path, capsys):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=3, batch_size=4, checkpoint_every=3, eval_every=3))
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, "-m", "moekit", "train", "--config", str(cfg), "--set", "parallel.expert_parallel=2",
           "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 is silent
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # The saved run resumes in one process (the degree is the launch's): experts regathered, two more steps.
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_steps=5"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    capsys.readouterr()
