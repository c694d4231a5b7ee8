"""benchmarks/repro/capacity_factor.py: paired differences and verdicts on made-up runs (the study itself takes
about half an hour), and its table."""


import pytest

SCRIPT = "capacity_factor"  # benchmarks/repro/capacity_factor.py, loaded by the script fixture (conftest.py)


def test_top1_against_top2_is_paired_by_seed(script):
    # Seed s: top-2 at 4.0 + s / 10 (a large seed effect); top-1 lower by 0.05 at CF 0.5 (every seed) and equal at
    # 1.0 up to +-0.02 noise; dropless 0.1 better than everything. Paired, the seed effect cancels.
    rows = []
    for s in range(3):
        for k in (1, 2):
            for cf in script.FACTORS:
                loss = 4.0 + s / 10 - (0.1 if cf == "none" else 0.0)
                if k == 1 and cf == "0.5":
                    loss -= 0.05
                if k == 1 and cf == "1.0":
                    loss += (-0.02, 0.02, 0.0)[s]
                rows.append({"arm": script.arm_name(k, cf), "seed": s, "final_val_loss": loss,
                             "mean_drop_fraction": 0.1})
    stats = script.analyse({"rows": rows})
    low, one = stats["claims"]
    assert (low["a"], low["b"]) == ("top1-cf0.5", "top2-cf0.5")
    assert low["mean"] == pytest.approx(-0.05) and low["half"] == pytest.approx(0.0, abs=1e-9)
    assert low["verdict"] == "reproduced"
    # Differences -0.02, +0.02, 0: mean 0, sd 0.02, half 4.303 x 0.02 / sqrt(3) = 0.0497.
    assert one["mean"] == pytest.approx(0.0, abs=1e-12) and one["half"] == pytest.approx(4.303 * 0.02 / 3**0.5)
    assert one["verdict"] == "not resolved at this scale"
    cost = next(c for c in stats["costs"] if c["a"] == "top2-cf2.0")
    assert cost["b"] == "top2-dropless" and cost["mean"] == pytest.approx(0.1)
    # The seed effect (0.1 per seed) is the seed standard deviation of an arm.
    assert stats["seed_sd"]["top2-cf1.0"] == pytest.approx(0.1)
    text = script.render({"config": {"command": "--out x", "steps": 600, "corpus": "mixed"}, "rows": rows}, stats)
    assert "| top1-cf0.5 - top2-cf0.5 | -0.0500 ± 0.0000 | negative (top-1 better at a low capacity factor) | " \
           "reproduced |" in text
