"""benchmarks/repro/switch_scaling.py: steps to a target on an evaluation curve, the gate at the end, paired
differences, speedups and verdicts on made-up runs against hand-computed values; and a tiny end-to-end run (a local
word-salad corpus, 4 steps, 2 seeds) whose files agree with each other (the study itself takes about 40 minutes)."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from tests.training.tiny_lm import write_tiny_corpus

SCRIPT = "switch_scaling"  # benchmarks/repro/switch_scaling.py, loaded by the script fixture (conftest.py)


def test_steps_to_target_is_the_first_step_at_or_below(script):
    curve = [(100, 6.0), (200, 5.0), (300, 4.6)]
    assert script.steps_to_target(curve, 4.8) == 300.0
    assert script.steps_to_target(curve, 5.0) == 200.0  # at the target counts
    assert script.steps_to_target(curve, 6.5) == 100.0
    assert script.steps_to_target(curve, 4.5) is None  # never reached
    # The order of the points does not matter; the first crossing counts although the curve rises again later.
    assert script.steps_to_target([(300, 5.6), (100, 6.0), (200, 5.0), (400, 4.0)], 5.5) == 200.0


def test_trailing_mean_over_a_window_of_steps(script):
    # Losses logged every 2 steps, loss = step; window 4: the steps in (t - 4, t], i.e. t - 2 and t, from t = 4 on.
    curve = [(s, float(s)) for s in range(2, 11, 2)]
    assert script.trailing_mean(curve, 4) == [(4, 3.0), (6, 5.0), (8, 7.0), (10, 9.0)]
    assert script.trailing_mean(curve, 1) == curve  # a window of one step: the curve itself
    assert script.trailing_mean(curve, 20) == []  # no whole window logged


def test_gate_at_the_end_is_the_mean_over_the_last_tenth(script):
    # Records every 10 steps of a 200-step run, mean_gate = step / 1000; the last 10 % are the steps after 180:
    # 190 and 200, mean (0.19 + 0.20) / 2 = 0.195. A record without the key (dense) gives None.
    records = [{"step": s, "mean_gate": s / 1000} for s in range(10, 201, 10)]
    assert script.end_mean(records, "mean_gate", 200) == pytest.approx(0.195)
    assert script.end_mean([{"step": 200, "loss": 1.0}], "mean_gate", 200) is None
    assert script.verdict(-0.3, 0.1, -1) == "reproduced"
    assert script.verdict(0.3, 0.1, -1) == "contradicted"
    assert script.verdict(0.05, 0.1, -1) == "not resolved at this scale"
    assert script.verdict(0.3, 0.1, +1) == "reproduced"


def _hand_rows():
    """3 seeds; the dense final loss d = 5.0, 5.1, 5.2 (a large seed effect that pairing removes); the curves (the
    trailing-average training loss) end at each run's final loss, which the dense seed's target then is."""
    rows = []
    for s in range(3):
        d = 5.0 + s / 10
        curves = {
            "dense": [(100, d + 1.0), (200, d + 0.4), (300, d)],
            # e2: 0.02 above dense on every seed, so it never comes down to d.
            "e2": [(100, d + 1.02), (200, d + 0.42), (300, d + 0.02)],
            # e8: 0.3 below at the end; first at or below d at steps 150, 125, 175.
            "e8": [
                [(100, d + 0.2), (150, d - 0.05), (200, d - 0.2), (300, d - 0.3)],
                [(100, d + 0.1), (125, d), (200, d - 0.3), (300, d - 0.3)],
                [(100, d + 0.3), (175, d - 0.01), (200, d - 0.1), (300, d - 0.3)],
            ][s],
            # e32: 0.05 below on seeds 0 and 1 (at or below d from step 240), 0.05 above on seed 2.
            "e32": [(100, d + 0.5), (200, d + 0.1), (240, d - 0.01), (300, d - 0.05)]
            if s < 2
            else [(100, d + 0.5), (200, d + 0.2), (300, d + 0.05)],
        }
        gates = {"dense": None, "e2": (0.6, 0.62, 0.58)[s], "e8": 0.2, "e32": 0.05}
        for arm, curve in curves.items():
            rows.append(
                {
                    "arm": arm,
                    "experts": script_experts(arm),
                    "seed": s,
                    "final_val_loss": curve[-1][1],
                    "unigram_val_loss": 6.5,
                    "mean_gate_end": gates[arm],
                    "mean_drop_fraction": 0.0,
                    "parameters_total": 1000,
                    "train_flops_per_token": 2000,
                    "curve": curve,
                }
            )
    return rows


def script_experts(arm):
    return 0 if arm == "dense" else int(arm[1:])


def test_analysis_on_hand_made_runs(script):
    stats = script.analyse({"rows": _hand_rows()})
    claims = {(c["a"], c["b"]): c for c in stats["claims"]}
    # e2 - dense: +0.02 on every seed, interval of width 0: contradicted. e8 - dense: -0.3 on every seed: reproduced.
    assert claims["e2", "dense"]["mean"] == pytest.approx(0.02) and claims["e2", "dense"]["half"] < 1e-9
    assert claims["e2", "dense"]["verdict"] == "contradicted"
    assert claims["e8", "dense"]["mean"] == pytest.approx(-0.3) and claims["e8", "dense"]["verdict"] == "reproduced"
    # e32 - dense: -0.05, -0.05, +0.05: mean -1/60, sd sqrt(((1/30)^2 x 2 + (1/15)^2) / 2) = 0.057735,
    # half 4.303 x 0.057735 / sqrt(3) = 0.14343: not resolved.
    c = claims["e32", "dense"]
    assert c["mean"] == pytest.approx(-1 / 60) and c["half"] == pytest.approx(4.303 * 0.057735 / math.sqrt(3), rel=1e-4)
    assert c["verdict"] == "not resolved at this scale"
    # e32 - e2: -0.07, -0.07, +0.03: mean -0.11 / 3.
    assert claims["e32", "e2"]["mean"] == pytest.approx(-0.11 / 3)
    assert claims["e32", "e2"]["per_seed"] == pytest.approx([-0.07, -0.07, 0.03])
    # Seed sd of the dense arm: sd(5.0, 5.1, 5.2) = 0.1.
    assert stats["seed_sd"]["dense"] == pytest.approx(0.1)
    # Gate: (0.6 + 0.62 + 0.58) / 3 = 0.6, sd 0.02, half 4.303 x 0.02 / sqrt(3) = 0.049687.
    assert stats["gates"]["e2"][0] == pytest.approx(0.6) and stats["gates"]["e2"][1] == pytest.approx(0.049687, 1e-4)

    # Steps to the dense seed's final loss d (the dense runs get there at 300):
    #   e8 seed 0: 150 -> speedup 300 / 150 = 2; seed 1: 125 -> 2.4; seed 2: 175 -> 12/7.
    #   Geometric mean (2 x 2.4 x 12/7)^(1/3) = 2.0194.
    sp = stats["speedups"]["e8"]
    assert [stats["per_run"][f"e8/{s}"]["steps_to_dense_loss"] for s in range(3)] == pytest.approx([150, 125, 175])
    assert sp["reached"] == 3 and sp["ratio"] == pytest.approx((2 * 2.4 * 12 / 7) ** (1 / 3))
    logs = [math.log(2), math.log(2.4), math.log(12 / 7)]
    half = 4.303 * statistics.stdev(logs) / math.sqrt(3)  # 4.303 x 0.16843 / 1.7321 = 0.41844
    assert sp["log_half"] == pytest.approx(half) and half == pytest.approx(0.41844, rel=1e-4)
    assert sp["low"] == pytest.approx(
        math.exp(statistics.fmean(logs) - half)
    )  # exp(0.70254 - 0.41844) = 1.3286 > 1: reproduced
    assert sp["verdict"] == "reproduced"
    # e32: seeds 0 and 1 at 240 (speedup 1.25), seed 2 never: no verdict from 2 of 3.
    e32 = stats["speedups"]["e32"]
    assert e32["reached"] == 2 and e32["ratio"] == pytest.approx(1.25)
    assert stats["per_run"]["e32/2"] == {"steps_to_dense_loss": None, "speedup": None}
    assert e32["verdict"] == "not resolved at this scale (1 of 3 not reached)"
    assert stats["speedups"]["e2"]["reached"] == 0 and "ratio" not in stats["speedups"]["e2"]
    # The curves' mean over seeds at each logged step: dense at step 300 is the mean of d, 5.1.
    assert stats["curves"]["dense"][-1][0] == 300 and stats["curves"]["dense"][-1][1] == pytest.approx(5.1)

    config = {"command": "--out x", "steps": 300, "corpus": "mixed"}
    text = script.render({"config": config, "rows": _hand_rows()}, stats)
    assert "| e8 - dense | -0.3000 ± 0.0000 | negative (the MoE lower at equal steps) | reproduced |" in text
    assert "| e8 | 3/3 | 150 ± 62 | 2.02x | [1.33, 3.07] | reproduced |" in text  # 150 ± 4.303 x 25 / sqrt(3)
    assert "| e2 | 0/3 | - | - | - | not resolved at this scale (3 of 3 not reached) |" in text
    assert "| e2 | 1,000 | 2,000 | 5.1200 ± " in text and "| 0.600 ± 0.050 | 0.500 |" in text


def test_tiny_study_end_to_end(script, tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=3000)
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = [
        "--out",
        str(out),
        "--runs",
        str(runs),
        "--seeds",
        "2",
        "--steps",
        "4",
        "--corpus",
        str(corpus),
        "--max-chars",
        "80000",
        "--jobs",
        "2",
    ]
    assert script.main(argv) == 0
    for name in ("results.json", "runs.csv", "results.md", "loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted((r["arm"], r["seed"]) for r in table) == sorted((a, str(s)) for a in script.ARMS for s in (0, 1))
    loss = {(r["arm"], int(r["seed"])): float(r["final_val_loss"]) for r in table}
    stats = json.loads((out / "results.json").read_text())["stats"]
    for c in stats["claims"]:  # each paired difference is the difference of the per-seed losses in runs.csv
        want = [loss[c["a"], s] - loss[c["b"], s] for s in (0, 1)]
        assert c["per_seed"] == pytest.approx(want) and c["mean"] == pytest.approx(sum(want) / 2)
    for r in table:
        if r["arm"] == "dense":
            assert r["mean_gate_end"] == "" and float(r["steps_to_dense_loss"]) == 4.0
        else:  # top-1 gates of E experts: at least the uniform 1/E, at most 1; dropless: no drops
            assert 1 / int(r["experts"]) <= float(r["mean_gate_end"]) <= 1.0
            assert float(r["mean_drop_fraction"]) == 0.0
    # Every run logged at steps 2 and 4 (a trailing window of one step at 4 steps): its curve is its logged
    # training cross-entropy.
    rows = json.loads((out / "results.json").read_text())["result"]["rows"]
    for r in rows:
        logged = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert r["curve"] == [[x["step"], pytest.approx(x["ce_loss"])] for x in logged if "ce_loss" in x]
        assert [p[0] for p in r["curve"]] == [2, 4]
    md = (out / "results.md").read_text()
    assert md.startswith(script.HEADING + "\n") and "](loss.png)" in md

    # --section puts the section into a RESULTS.md elsewhere, its plot linked from there, and keeps the rest.
    results_md = tmp_path / "docs" / "RESULTS.md"
    results_md.parent.mkdir()
    results_md.write_text("# Results\n\n## Another study\n\ntext\n")
    assert script.main(["--out", str(out), "--section", str(results_md)]) == 0
    text = results_md.read_text()
    assert text.startswith("# Results\n\n## Another study\n\ntext\n\n" + script.HEADING)
    assert "](../out/loss.png)" in text
