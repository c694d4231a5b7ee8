"""A resume never NUL-pads ``metrics.jsonl`` (issue 18): a log shorter than the checkpoint recorded keeps its lines,
the gap is reported in one line, and the next records follow whole lines."""

from __future__ import annotations

import json

from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config
from moekit.training.metrics import read_metrics


def test_a_shortened_metrics_log_is_reported_never_nul_padded(trained):
    run_dir, cfg = trained
    log_path = run_dir / "metrics.jsonl"
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert max(r["step"] for r in read_metrics(log_path)) == 8
    # lose the records after step 5, and leave a torn half line behind
    kept = [ln for ln in lines if json.loads(ln)["step"] <= 5]
    log_path.write_bytes(b"".join(kept) + lines[len(kept)][:10])
    messages: list[str] = []
    train_run(load_run_config(cfg, ["train.max_steps=12"]), run_dir, resume=True, log=messages.append)
    data = log_path.read_bytes()
    assert b"\0" not in data
    records = read_metrics(log_path)
    assert len(records) == len(data.splitlines())  # every line is a whole record: the torn one was cut
    steps = sorted({r["step"] for r in records})
    assert steps == [1, 2, 3, 4, 5, 9, 10, 11, 12]
    gap = [m for m in messages if "metrics.jsonl is shorter than at the checkpoint" in m]
    assert len(gap) == 1 and "steps 6-8 are missing" in gap[0], messages
