"""benchmarks/repro/glam_layout.py: the learning-rate choice, the FLOP match of the configs, paired differences and
verdicts on made-up runs against hand-computed values, and the report's table lines (no end-to-end run: the study
takes about 50 minutes, and test_switch_scaling_script.py covers the run plumbing the studies share)."""

import math

import pytest

SCRIPT = "glam_layout"  # benchmarks/repro/glam_layout.py, loaded by the script fixture (conftest.py)


def _sweep_rows():
    """2 seeds at lr 1e-3, 3e-3, 1e-2 (losses exact in binary, so the tie below is exact)."""
    losses = {
        # every2: 3e-3 and 1e-2 tie at a mean of 4.625 (4.5 + 4.75, 4.625 + 4.625): the lower rate wins.
        "every2": {1e-3: (4.75, 5.0), 3e-3: (4.5, 4.75), 1e-2: (4.625, 4.625)},
        # dense-every2: seed 0 diverged at 1e-2 (nan counts as infinite, whatever seed 1 did): 3e-3.
        "dense-every2": {1e-3: (4.7, 4.8), 3e-3: (4.6, 4.7), 1e-2: (math.nan, 4.0)},
        # every4: best at the top of the grid; dense-every4: at the bottom.
        "every4": {1e-3: (5.0, 5.0), 3e-3: (4.9, 4.9), 1e-2: (4.8, 4.8)},
        "dense-every4": {1e-3: (4.6, 4.6), 3e-3: (4.7, 4.7), 1e-2: (4.8, 4.8)},
    }
    return [
        {"arm": arm, "lr": lr, "seed": s, "final_val_loss": pair[s]}
        for arm, by_lr in losses.items()
        for lr, pair in by_lr.items()
        for s in (0, 1)
    ]


def test_best_learning_rate(script):
    rows = _sweep_rows()
    assert script.best_lr(rows, "every2") == 3e-3  # a tie goes to the lower rate
    assert script.best_lr(rows, "dense-every2") == 3e-3  # 1e-2's mean is infinite, not (nan + 4.0) / 2
    assert script.best_lr(rows, "every4") == 1e-2
    assert script.best_lr(rows, "dense-every4") == 1e-3
    # The order of the rows does not matter, and a missing loss counts like a non-finite one.
    assert script.best_lr(list(reversed(rows)), "every2") == 3e-3
    assert (
        script.best_lr(
            [{"arm": "a", "lr": 1e-2, "final_val_loss": None}, *[{"arm": "a", "lr": 1e-3, "final_val_loss": 9.0}]], "a"
        )
        == 1e-3
    )
    with pytest.raises(ValueError):
        script.best_lr(rows, "no-such-arm")


def test_dense_arms_match_their_moe_arms_in_flops(script):
    class Args:
        corpus, max_chars, layers = "mixed", None, 4

    checks = {c["arm"]: c for c in script.flop_check(Args())}
    # Router matmul: 8 experts x d_model 64 per MoE block, 6 FLOPs per parameter in training (2 forward x 3).
    assert checks["every2"]["moe_blocks"] == [1, 3] and checks["every2"]["router_train_flops"] == 6 * 8 * 64 * 2
    assert checks["every2"]["train_flops_moe"] == 2_562_048 and checks["every2"]["train_flops_dense"] == 2_555_904
    assert checks["every4"]["moe_blocks"] == [3] and checks["every4"]["router_train_flops"] == 6 * 8 * 64
    Args.layers = 8  # every fourth block of 8: blocks 3 and 7; every other: 1, 3, 5, 7
    checks = {c["arm"]: c for c in script.flop_check(Args())}
    assert checks["every4"]["moe_blocks"] == [3, 7] and checks["every2"]["moe_blocks"] == [1, 3, 5, 7]
    assert script.blocks_of("dense-every4", 8) == [3, 7]


def _hand_result(script):
    """3 seeds with a seed effect b = 4.4 + s / 10 (which pairing removes):
    dense-every2 = b + 0.10, every2 = dense-every2 - (0.06, 0.05, 0.04),
    dense-every4 = b + 0.05, every4 = dense-every4 + (0.03, 0.02, 0.04)."""
    sweep = _sweep_rows()
    lr = {a: script.best_lr(sweep, a) for a in script.ARMS}
    flops = {"every2": 2_562_048, "dense-every2": 2_555_904, "every4": 2_362_368, "dense-every4": 2_359_296}
    params = {"every2": 788_032, "dense-every2": 393_792, "every4": 558_144, "dense-every4": 361_024}
    rows = []
    for s in range(3):
        b = 4.4 + s / 10
        loss = {
            "dense-every2": b + 0.10,
            "every2": b + 0.10 - (0.06, 0.05, 0.04)[s],
            "dense-every4": b + 0.05,
            "every4": b + 0.05 + (0.03, 0.02, 0.04)[s],
        }
        for a in script.ARMS:
            rows.append(
                {
                    "arm": a,
                    "lr": lr[a],
                    "seed": s,
                    "steps": 500,
                    "final_val_loss": loss[a],
                    "unigram_val_loss": 6.4,
                    "mean_drop_fraction": 0.0,
                    "parameters_total": params[a],
                    "train_flops_per_token": flops[a],
                }
            )
    return {"lr": lr, "sweep": sweep, "rows": rows}


def test_analysis_on_hand_made_runs(script):
    result = _hand_result(script)
    stats = script.analyse(result)
    half = 4.303 * 0.01 / math.sqrt(3)  # sd 0.01 over 3 seeds: 0.024843
    claims = {(c["a"], c["b"]): c for c in stats["claims"]}
    # every2 - dense-every2: -0.06, -0.05, -0.04: mean -0.05 ± 0.0248, below 0: reproduced.
    c = claims["every2", "dense-every2"]
    assert c["per_seed"] == pytest.approx([-0.06, -0.05, -0.04])
    assert c["mean"] == pytest.approx(-0.05) and c["half"] == pytest.approx(half) and c["verdict"] == "reproduced"
    # every4 - dense-every4: +0.03, +0.02, +0.04: mean +0.03 ± 0.0248, above 0 against the paper: contradicted.
    c = claims["every4", "dense-every4"]
    assert c["mean"] == pytest.approx(0.03) and c["half"] == pytest.approx(half) and c["verdict"] == "contradicted"
    reported = {(c["a"], c["b"]): c for c in stats["reported"]}
    # every2 - every4 = b + (0.04, 0.05, 0.06) - (b + (0.08, 0.07, 0.09)) = -0.04, -0.02, -0.03: mean -0.03; no verdict.
    c = reported["every2", "every4"]
    assert c["per_seed"] == pytest.approx([-0.04, -0.02, -0.03]) and c["half"] == pytest.approx(half)
    assert "verdict" not in c and "paper" not in c
    # dense-every2 - dense-every4 = +0.05 on every seed (the wider dense model worse), interval of width 0.
    c = reported["dense-every2", "dense-every4"]
    assert c["mean"] == pytest.approx(0.05) and c["half"] == pytest.approx(0.0, abs=1e-9)
    # Seed sd of dense-every2: sd(4.5, 4.6, 4.7) = 0.1; of every2: sd(4.44, 4.55, 4.66) = 0.11.
    assert stats["seed_sd"]["dense-every2"] == pytest.approx(0.1) and stats["seed_sd"]["every2"] == pytest.approx(0.11)
    assert stats["lr"] == {"every2": 3e-3, "dense-every2": 3e-3, "every4": 1e-2, "dense-every4": 1e-3}
    assert stats["lr_at_edge"] == {"every2": False, "dense-every2": False, "every4": True, "dense-every4": True}
    sweep = {(e["arm"], e["lr"]): e for e in stats["sweep"]}
    # dense-every2 at 1e-3: (4.7, 4.8), mean 4.75, sd 0.1 / sqrt(2), half 12.706 x 0.1 / 2 = 0.6353; at 1e-2 a seed
    # diverged: infinite mean, no interval.
    assert sweep["dense-every2", 1e-3]["mean"] == pytest.approx(4.75)
    assert sweep["dense-every2", 1e-3]["half"] == pytest.approx(0.6353)
    assert math.isinf(sweep["dense-every2", 1e-2]["mean"]) and math.isnan(sweep["dense-every2", 1e-2]["half"])

    config = {"command": "--out x", "steps": 500, "corpus": "mixed", "layers": 4, "sweep_seeds": 2}
    text = script.render({**result, "config": config}, stats)
    assert text.startswith(script.HEADING + "\n")
    assert "| arm | lr 0.001 | lr 0.003 | lr 0.01 |" in text
    assert "| dense-every2 | 4.7500 ± 0.6353 | **4.6500 ± 0.6353** | diverged |" in text
    assert "| dense-every4 | **4.6000 ± 0.0000** | 4.7000 ± 0.0000 | 4.8000 ± 0.0000 |" in text
    # every2: mean 4.55, half 4.303 x 0.11 / sqrt(3) = 0.27328.
    assert "| every2 | 1, 3 | 0.003 | 788,032 | 2,562,048 | 4.5500 ± 0.2733 | 0.1100 | 0.000 |" in text
    assert "| every4 | 3 | 0.01 | 558,144 | 2,362,368 | " in text
    assert (
        "| every2 - dense-every2 | 2,562,048 vs 2,555,904 | -0.0500 ± 0.0248 | negative (the MoE lower than its "
        "FLOP-matched dense model) | reproduced |" in text
    )
    assert "| every4 - dense-every4 | 2,362,368 vs 2,359,296 | +0.0300 ± 0.0248 | negative (" in text
    assert "| every2 - every4 | 2,562,048 vs 2,362,368 | -0.0300 ± 0.0248 |" in text
    assert "| dense-every2 - dense-every4 | 2,555,904 vs 2,359,296 | +0.0500 ± 0.0000 |" in text
    assert "The best rate of every4, dense-every4 is at an end of the sweep" in text
    assert text.rstrip().endswith("](loss.png)")
