"""metrics.jsonl (standard JSON even for NaN, truncation on resume, torn last line) and the progress
display."""

from __future__ import annotations

import io
import json
import math

import pytest

from moekit.training.metrics import MetricsLog, Progress, load_cv, max_violation, read_metrics


def test_log_writes_standard_json_and_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1, "loss": 2.5})
    size = log.flush()
    log.write({"step": 2, "loss": float("nan"), "grad_norm": float("inf")})
    log.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "loss": "nan", "grad_norm": "inf"}  # strict JSON parses it
    MetricsLog(path, truncate_to=size).close()
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}]
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a line torn by SIGKILL
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}]


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress(10, "auto", stream=tty)
    bar.update(5, "loss 1.0")
    bar.close()
    assert tty.getvalue().startswith("\r[############------------] 5/10 loss 1.0 eta")
    pipe = io.StringIO()
    plain = Progress(10, "auto", stream=pipe)
    plain.update(5, "loss 1.0")
    assert pipe.getvalue().startswith("step 5/10 loss 1.0 eta") and pipe.getvalue().endswith("s\n")
    off = io.StringIO()
    Progress(10, "off", stream=off).update(5, "x")
    assert off.getvalue() == ""


def test_load_imbalance_by_hand():
    # loads [4, 2, 2, 0]: mean 2, max 4 -> 2.0; deviations [2, 0, 0, -2], variance 8 / 4 = 2, CV sqrt(2) / 2
    assert max_violation([4, 2, 2, 0]) == 2.0
    assert load_cv([4, 2, 2, 0]) == pytest.approx(math.sqrt(2) / 2)
    assert max_violation([3, 3, 3]) == 1.0 and load_cv([3, 3, 3]) == 0.0
    assert max_violation([0, 0]) == 0.0 and load_cv([0, 0]) == 0.0
