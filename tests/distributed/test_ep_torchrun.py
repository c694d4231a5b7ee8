"""``torchrun -m moekit train --set parallel.expert_parallel=2`` end to end, then ``moekit eval`` and ``--resume`` in
one process, both reading the run's sharded checkpoint; and two torchrun "nodes" (data parallel with FSDP)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import pytest  # noqa: E402
from tiny_lm import tiny_config_text, write_tiny_corpus  # noqa: E402

from moekit.lab.cli import main  # noqa: E402
from tests.distributed._launch import free_port  # noqa: E402


def test_torchrun_train_then_resume_with_one_process(tmp_path, capsys):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=3, batch_size=4, checkpoint_every=3, eval_every=3))
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # Routing groups of one sequence: the ranks' evaluation then equals one process's (capacity per sequence).
    cmd = [*torchrun, "-m", "moekit", "train", "--config", str(cfg), "--set", "parallel.expert_parallel=2",
           "--set", "moe.group_size=16", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 is silent
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # Each rank wrote its own shards; one process evaluates them (load_trained_run, as generate / export-hf do) to the
    # validation loss the two ranks computed at step 3 with the same batches.
    assert not (run_dir / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--batches", "2"]) == 0
    line = capsys.readouterr().out
    assert "checkpoint step_00000003 (step 3)" in line, line
    evaluated = float(re.search(r"validation loss ([0-9.]+) nats/token", line).group(1))
    assert evaluated == pytest.approx(records[-1]["val_loss"], abs=1e-4)
    # The saved run resumes in one process (the degree is the launch's): experts regathered, two more steps.
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_steps=5"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    capsys.readouterr()


def test_two_torchrun_nodes_train_with_fsdp_then_one_process_evaluates(tmp_path, capsys):
    """Two torchrun launches on one machine stand for two nodes (static rendezvous on one address, as on a cluster):
    (dp 2, ep 1) with FSDP, each node one process; then one process evaluates the sharded checkpoint and resumes the
    run."""
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=300)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(corpus, max_steps=2, batch_size=4, checkpoint_every=2, eval_every=2))
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "moekit", "train", "--config", str(cfg), "--set", "parallel.data_parallel=2",
               "--set", "parallel.fsdp=true", "--set", "moe.group_size=16", "--run-dir", str(run_dir)]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=150) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-2000:]
    assert outputs[0][0].count("run directory:") == 1 and "run directory:" not in outputs[1][0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    manifest = json.loads((run_dir / "checkpoints" / "step_00000002" / "manifest.json").read_text())
    assert manifest["layout"] == {"world": 2, "dp": 2, "ep": 1}
    assert sorted(e["rank"] for n, e in manifest["files"].items() if n.endswith(".safetensors")) == [0, 1]
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--batches", "2"]) == 0
    evaluated = float(re.search(r"validation loss ([0-9.]+) nats/token", capsys.readouterr().out).group(1))
    assert evaluated == pytest.approx(records[-1]["val_loss"], abs=1e-4)
    # And resumes on one process: FSDP is dropped there (nothing to shard over), the config keeps the rest.
    assert main(["train", "--resume", str(run_dir), "--set", "train.max_steps=3"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    capsys.readouterr()
