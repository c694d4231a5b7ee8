"""benchmarks/repro/init_scale.py: Levene's statistic, its permutation p-value, the paired mean and the verdicts on
made-up runs (the study itself takes about half an hour)."""

import itertools
import statistics

import pytest

SCRIPT = "init_scale"  # benchmarks/repro/init_scale.py, loaded by the script fixture (conftest.py)


A = [1.0, 1.1, 0.9, 1.05, 0.95]
B = [1.0, 1.5, 0.6, 1.3, 0.7]


def test_levene_statistic_by_hand(script):
    # Deviations from the medians (1.0 both): a 0, .1, .1, .05, .05 (mean .06); b 0, .5, .4, .3, .3 (mean .3); grand
    # mean .18. Between = 5 x .12^2 x 2 = .144; within = .007 + .14 = .147; W = (10 - 2) x .144 / .147 = 7.8367.
    assert script.levene(A, B) == pytest.approx(8 * 0.144 / 0.147)
    assert script.levene(A, A) == 0.0


def test_permutation_p_matches_full_enumeration(script):
    # All C(10, 5) = 252 ways to label five of the ten values "a": the exact permutation p-value.
    observed, pooled = script.levene(A, B), A + B
    hits = 0
    for chosen in itertools.combinations(range(10), 5):
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(10) if i not in chosen]
        hits += script.levene(a, b) >= observed * (1 - 1e-12)
    exact = hits / 252
    # 20,000 random relabellings: a standard error below 0.002 at p near 0.03.
    assert script.levene_permutation_p(A, B) == pytest.approx(exact, abs=0.008)
    assert exact < 0.05


def test_analysis_and_verdicts(script):
    # Init 0.1 at A (tight), 1.0 at B + 0.2 (spread out and worse on average): paired 0.1 - 1.0 = A - B - 0.2.
    rows = [{"arm": "0.1", "seed": s, "final_val_loss": A[s], "skipped_steps": 0} for s in range(5)]
    rows += [{"arm": "1.0", "seed": s, "final_val_loss": B[s] + 0.2, "skipped_steps": s} for s in range(5)]
    stats = script.analyse({"rows": rows})
    d = [a - b - 0.2 for a, b in zip(A, B, strict=True)]  # -0.2, -0.6, 0.1, -0.45, 0.05: mean -0.22
    assert stats["diff"]["mean"] == pytest.approx(-0.22)
    assert stats["diff"]["half"] == pytest.approx(2.776 * statistics.stdev(d) / 5**0.5)
    assert stats["diff"]["verdict"] == "not resolved at this scale"  # half-width 0.37 > 0.22
    assert stats["sd_ratio"]["ratio"] == pytest.approx(0.0790569 / 0.3834058, rel=1e-5)
    assert stats["sd_ratio"]["low"] <= stats["sd_ratio"]["ratio"] <= stats["sd_ratio"]["high"]
    assert stats["levene"]["verdict"] == "reproduced"  # p < 0.05 and sd(0.1) < sd(1.0)
    assert stats["skipped"] == {"0.1": 0, "1.0": 10}
    # The arms the other way round: the same p-value, the other side.
    swapped = [{**r, "arm": "1.0" if r["arm"] == "0.1" else "0.1"} for r in rows]
    assert script.analyse({"rows": swapped})["levene"]["verdict"] == "contradicted"
    text = script.render({"config": {"command": "--out x", "steps": 400, "corpus": "mixed", "layers": 8},
                          "rows": rows}, stats)
    assert "| mean: 0.1 - 1.0 (paired) | -0.2200 ± " in text
