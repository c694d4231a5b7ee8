"""benchmarks/repro/zloss_stability.py: Fisher's exact test and the spike count against hand-computed values, and
the verdicts the analysis gives on made-up runs (the study itself takes about an hour)."""

import argparse
import math

import pytest

SCRIPT = "zloss_stability"  # benchmarks/repro/zloss_stability.py, loaded by the script fixture (conftest.py)


def test_fisher_exact_two_sided(script):
    # 0/8 vs 5/8 unstable: the tables with margins (5 unstable of 16) and a = 0..5 have probabilities
    # C(8,a) C(8,5-a) / C(16,5) = 56, 560, 1568, 1568, 560, 56 over 4368; as or less likely than a = 0: 56 + 56.
    assert script.fisher_two_sided(0, 8, 5, 8) == pytest.approx(112 / 4368)
    assert script.fisher_two_sided(0, 8, 8, 8) == pytest.approx(2 / math.comb(16, 8))
    assert script.fisher_two_sided(3, 8, 3, 8) == pytest.approx(1.0)


def test_spikes_count_rises_above_the_running_minimum_and_non_finite_losses(script):
    # 4.6 > 4 + 0.5; 3.4 is not > 3 + 0.5; nan; 3.6 > 3.5.
    assert script.spikes([5.0, 4.0, 4.6, 3.0, 3.4, math.nan, 3.6], 0.5) == 3
    assert script.spikes([5.0, 5.4, 4.0], 0.5) == 0


def test_analysis_gives_the_verdicts_of_the_standard(script):
    seeds = 4
    args = argparse.Namespace(seeds=seeds, sweep_seeds=2, spike=0.5, command="--out x")
    edge = {f"{arm}/{s}": {"spikes": n} for arm, counts in
            {"none": [1, 2, 1, 3], "zloss": [0, 0, 0, 0], "clip": [0, 1, 0, 0]}.items()
            for s, n in enumerate(counts)}
    # Losses: z-loss better by 0.01 +- 0.001 on every seed, clipping worse by 0.2 on every seed.
    none = [4.0, 4.1, 4.2, 4.3]
    quality = {**{f"none/{s}": {"final_val_loss": none[s]} for s in range(seeds)},
               **{f"zloss/{s}": {"final_val_loss": none[s] - 0.01 - 0.001 * s} for s in range(seeds)},
               **{f"clip/{s}": {"final_val_loss": none[s] + 0.2} for s in range(seeds)}}
    result = {"sweep": {"0.3": 0, "1.0": 1}, "edge_lr": 1.0, "stable_lr": 0.3,
              "edge": {"lr": 1.0, "runs": edge}, "quality": {"lr": 0.3, "runs": quality}}
    stats = script.analyse(result, args)
    # 0/4 vs 4/4 unstable: p = 2 / C(8, 4) = 0.029 < 0.05, fewer: reproduced; 1/4 vs 4/4: p = 0.143, not resolved.
    assert stats["edge"]["tests"]["zloss"]["p"] == pytest.approx(2 / 70)
    assert stats["edge"]["tests"]["zloss"]["verdict"] == "reproduced"
    assert stats["edge"]["tests"]["clip"]["verdict"] == "not resolved at this scale"
    assert stats["quality"]["diffs"]["zloss"]["mean"] == pytest.approx(-0.0115)
    assert stats["quality"]["diffs"]["zloss"]["verdict"] == "reproduced"
    assert stats["quality"]["diffs"]["clip"]["verdict"] == "reproduced"  # worse, as the paper says
    text = script.render(result, stats, args)
    assert "| zloss | 0/4 | 0.029 | reproduced |" in text
    assert "| clip | " in text and "+0.2000 ± 0.0000 | worse | reproduced |" in text
