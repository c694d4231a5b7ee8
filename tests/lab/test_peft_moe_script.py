"""benchmarks/repro/peft_moe.py: the exact McNemar test, paired differences, verdicts and the whole analysis on
made-up predictions (the study itself takes about 70 minutes), its table and its files."""

import json
import math

import pytest

SCRIPT = "peft_moe"  # benchmarks/repro/peft_moe.py, loaded by the script fixture (conftest.py)


def test_mcnemar_exact_golden_values(script):
    # b = 1, c = 9: n = 10, P(X <= 1) = (C(10,0) + C(10,1)) / 2^10 = 11 / 1024, p = 22 / 1024 = 0.021484375.
    assert script.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert script.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)  # symmetric
    # b = 2, c = 8: (1 + 10 + 45) / 1024 = 56 / 1024, p = 112 / 1024 = 0.109375.
    assert script.mcnemar_exact(2, 8) == pytest.approx(0.109375)
    # b = 0, c = 6: 2 * (1 / 64) = 0.03125; b = 0, c = 5: 2 / 32 = 0.0625 (five discordant pairs never reach 0.05).
    assert script.mcnemar_exact(0, 6) == pytest.approx(0.03125)
    assert script.mcnemar_exact(0, 5) == pytest.approx(0.0625)
    # b = c = 5: 2 * 638 / 1024 > 1, capped at 1; no discordant pair: 1.
    assert script.mcnemar_exact(5, 5) == 1.0 and script.mcnemar_exact(0, 0) == 1.0
    # Large counts stay exact: b = 40, c = 60 gives 0.0569 (normal approximation with continuity: 0.0578).
    assert script.mcnemar_exact(40, 60) == pytest.approx(0.05689, abs=5e-5)
    with pytest.raises(ValueError):
        script.mcnemar_exact(-1, 3)


def test_paired_difference_and_parity(script):
    a = [True] * 6 + [False] * 2 + [True, False]
    b = [True] * 6 + [True] * 2 + [False, False]
    d = script.paired_difference(a, b)
    # One item only a gets right, two only b: diff (1 - 2) / 10 = -0.1; se = sqrt(3 - 1 / 10) / 10 = 0.1703.
    assert (d["n"], d["a_only"], d["b_only"]) == (10, 1, 2)
    assert d["diff"] == pytest.approx(-0.1) and d["half"] == pytest.approx(1.96 * math.sqrt(2.9) / 10)
    assert d["p"] == 1.0
    assert script.parity_verdict(-0.01, 0.005) == "reproduced"  # [-0.015, -0.005] above -0.02
    assert script.parity_verdict(-0.05, 0.01) == "contradicted"  # [-0.06, -0.04] below -0.02
    assert script.parity_verdict(-0.02, 0.01) == "not resolved at this scale"
    assert script.balanced_accuracy(["x", "x", "x", "y"], ["x", "x", "x", "x"]) == 0.5


def _preds(task, n, correct, gold="x", other="y", calibrated_correct=None):
    out = []
    for i in range(n):
        rec = {"task": task, "id": f"{task}:{i}", "gold": gold, "pred": gold if i < correct else other}
        if calibrated_correct is not None:
            rec["calibrated_pred"] = gold if i < calibrated_correct else other
        out.append(rec)
    return out


def _run(method, seed, seen_correct, held_correct, curve=None, routing=None):
    preds = _preds("a", 100, seen_correct) + _preds("h", 50, 25, calibrated_correct=held_correct)
    # Task h has two gold classes: the first 25 items "x", the other 25 "y" (answer "x" always wrong there).
    for r in preds[100 + 25:]:
        r["gold"] = "y"
        r["pred"] = "x"
        r["calibrated_pred"] = "x"
    return {"method": method, "seed": seed, "lr": 1e-3, "run_dir": f"r/{method}{seed}", "trainable_params": 10,
            "trainable_fraction": 0.1, "train_time_s": 1.0, "curve": curve or [], "routing_specialisation": routing,
            "predictions": preds}


def _routing(trained, null):
    return {"trained": {"mean_input": trained, "mean_all": trained + 0.1,
                        "sites": {f"s{i}": {"input": trained} for i in range(4)}},
            "null": {"mean_input": null, "mean_all": null + 0.1, "sites": {f"s{i}": {"input": null} for i in range(4)}}}


def _result():
    runs = []
    curve = [{"step": 50, "dev_mean": 0.6}, {"step": 100, "dev_mean": 0.7}, {"step": 150, "dev_mean": 0.74},
             {"step": 200, "dev_mean": 0.745}]
    for s in (0, 1):
        runs.append(_run("full", s, 80, 20, curve))
        runs.append(_run("ia3", s, 60, 10, curve))
        runs.append(_run("mov10", s, 79, 20, curve, _routing(0.30 + s / 100, 0.05)))
        runs.append(_run("lora", s, 78, 20, curve))
        runs.append(_run("molora10", s, 78, 20, curve, _routing(0.05, 0.05)))
        runs.append(_run("frozen", s, 50, 5))
        runs.append({**_run("probe", s, 90, 0), "predictions": _preds("a", 100, 90)})
    sweep = [{"method": "ia3", "lr": lr, "dev_mean": v, "curve": [], "train_time_s": 1.0, "run_dir": "x"}
             for lr, v in ((3e-3, 0.5), (1e-2, 0.6), (3e-2, 0.55))]
    sweep += [{"method": "full", "lr": lr, "dev_mean": v, "curve": [], "train_time_s": 1.0, "run_dir": "x"}
              for lr, v in ((1e-5, 0.5), (3e-5, 0.6), (1e-4, 0.7))]
    cfg = {"seen_tasks": ["a"], "heldout_tasks": ["h"], "steps": 200, "warmup_steps": 10, "routing_items": 100,
           "command": "--out x"}
    return {"config": cfg, "sweep": sweep, "chosen": {"ia3": 1e-2, "full": 1e-4}, "runs": runs}


def test_analysis_on_hand_made_predictions(script):
    stats = script.analyse(_result())
    t = stats["table"]
    assert t["full"]["seen_mean"] == (pytest.approx(0.8), 0.0)
    # Held-out h, calibrated: items 0-19 right (all gold x), none of the gold-y half: recall x = 20 / 25, y = 0,
    # balanced 0.4; uncalibrated: 25 of 25 x right, 0 of y: 0.5.
    assert t["full"]["heldout"][0] == pytest.approx(0.4) and t["full"]["heldout_uncalibrated"][0] == pytest.approx(0.5)
    assert t["majority"]["seen_mean"][0] == pytest.approx(1.0)  # every gold of task a is "x"
    assert t["majority"]["heldout"][0] == pytest.approx(0.5)  # one answer: balanced accuracy 1 / 2 classes
    assert t["probe"]["seen_mean"][0] == pytest.approx(0.9) and math.isnan(t["probe"]["heldout"][0])
    comp = {(c["a"], c["b"], c["split"]): c for c in stats["comparisons"]}
    # MoV 79 vs (IA)3 60 right per seed, nested: 19 items x 2 seeds only MoV right, none only (IA)3.
    mov_ia3 = comp["mov10", "ia3", "seen"]
    assert (mov_ia3["n"], mov_ia3["a_only"], mov_ia3["b_only"]) == (200, 38, 0)
    assert mov_ia3["p"] == pytest.approx(2 / 2**38) and mov_ia3["verdict"] == "reproduced"
    # MoV vs full: 2 items only full right, diff -0.01 +- 1.96 sqrt(2 - 4/200) / 200 = 0.0138, so [-0.024, 0.004]
    # reaches below the -0.02 margin: not resolved with 200 items.
    assert comp["mov10", "full", "seen"]["diff"] == pytest.approx(-0.01)
    assert comp["mov10", "full", "seen"]["half"] == pytest.approx(1.96 * math.sqrt(2 - 4 / 200) / 200)
    assert comp["mov10", "full", "seen"]["verdict"] == "not resolved at this scale"
    assert comp["molora10", "lora", "seen"]["verdict"] == "not resolved at this scale"  # identical answers
    assert comp["ia3", "full", "seen"]["verdict"] == "reproduced"  # 40 only full right, paper side -1
    assert comp["lora", "full", "seen"]["verdict"] == "-"
    held = comp["mov10", "ia3", "held-out"]
    # Calibrated, per seed: MoV right on 20 of the 25 gold-x items, (IA)3 on 10, neither on gold y: balanced
    # 0.4 - 0.2 = +0.2 in both seeds; every resample keeps MoV's 10 extra x items ahead.
    assert held["n"] == 100 and held["diff"] == pytest.approx(0.2)
    assert 0 < held["low"] < 0.2 < held["high"] and held["p"] == 0.0 and held["verdict"] == "reproduced"
    transfer = {c["a"]: c for c in stats["transfer"]}
    # full 20 against frozen 5 of the gold-x items: 0.4 - 0.1 = +0.3.
    assert transfer["full"]["diff"] == pytest.approx(0.3) and transfer["full"]["verdict"] == "reproduced"
    assert comp["lora", "full", "held-out"]["verdict"] == "-"
    r = stats["routing"]
    # MoV: 4 sites x 2 seeds all above the null: sign test 2 / 2^8 = 0.0078; MoLoRA equal to its null: no sign.
    assert (r["mov10"]["sites_up"], r["mov10"]["sites_down"]) == (8, 0)
    assert r["mov10"]["p"] == pytest.approx(2 / 256) and r["mov10"]["verdict"] == "reproduced"
    assert r["mov10"]["diff"][0] == pytest.approx(0.255)
    assert r["molora10"]["verdict"] == "not resolved at this scale"
    assert stats["sweep"]["ia3"]["best"] == 1e-2 and not stats["sweep"]["ia3"]["edge"]
    assert stats["sweep"]["full"]["best"] == 1e-4 and stats["sweep"]["full"]["edge"]
    assert stats["curves"]["mov10"]["last_quarter_gain"][0] == pytest.approx(0.005)
    assert stats["items"] == {"a": 100, "h": 50}


def test_report_and_files(script, tmp_path):
    result = _result()
    stats = script.write(result, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith(script.HEADING + "\n")
    # 38 discordant pairs, all for MoV: diff 0.19, se sqrt(38 - 38^2 / 200) / 200 = 0.0276, p = 2 / 2^38.
    assert ("| MoV-10 vs (IA)3 | 200 | 38 | 0 | +0.190 ± 0.054 | 7.3e-12 | MoV-10 beats (IA)3 | reproduced |"
            in text)
    held = next(c for c in stats["comparisons"] if (c["a"], c["b"], c["split"]) == ("mov10", "ia3", "held-out"))
    assert (f"| MoV-10 vs (IA)3 | 100 | +0.200 [{held['low']:+.3f}, {held['high']:+.3f}] | < 0.0005 | "
            "MoV-10 beats (IA)3 | reproduced |") in text
    assert "| (IA)3 | 0.003: 0.500 | 0.01: 0.600 | 0.03: 0.550 | 0.01 | no |" in text
    for name in ("lr_sweep.png", "accuracy.png", "learning_curves.png", "runs.csv"):
        assert (tmp_path / name).stat().st_size > 100
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "predictions" not in saved["result"]["runs"][0] and saved["stats"]["routing"]["mov10"]["sites_up"] == 8
    assert stats["comparisons"]
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Other\n\ntext\n")
    assert script.main(["--out", str(tmp_path), "--section", str(md)]) == 0
    body = md.read_text()
    assert "## Other\n\ntext\n" in body and script.HEADING in body and "](lr_sweep.png)" in body


def test_next_lr_walks_the_half_decade_grid(script):
    assert [script.next_lr(x, up=True) for x in (1e-4, 3e-4, 3e-2, 1e-3)] == [3e-4, 1e-3, 1e-1, 3e-3]
    assert [script.next_lr(x, up=False) for x in (1e-5, 3e-4, 3e-3, 1.0)] == [3e-6, 1e-4, 1e-3, 0.3]


def test_sweep_extends_a_grid_whose_best_point_is_an_end(script, monkeypatch, tmp_path):
    """The sweep adds the next half-decade point beyond an end that wins, reruns, and stops after MAX_EXTEND points
    or once the best is inside the grid; phase 2 then trains at the final choice."""
    import argparse

    import moekit.lab.adapters.tasks as tasks

    # Made-up dev means, falling with the distance in decades from a peak: full fine-tuning peaks at 3e-4 (one
    # point beyond its grid: found, then confirmed by the point after it), (IA)3 keeps rising (the cap stops it at
    # 0.3, two points beyond 0.03), LoRA peaks inside its grid at 1e-3.
    peak = {"full": 3e-4, "ia3": 10.0, "lora": 1e-3}
    calls = []

    def fake_run_all(jobs, workers):
        calls.append([j[0].rsplit("/", 1)[-1] for j in jobs])
        out = []
        for run_dir, cfg, _ in jobs:
            lr = cfg.get("lr")
            dev = -abs(math.log10(lr) - math.log10(peak[cfg["method"]])) if lr else 0.0
            out.append({"splits": {"dev": {"seen_mean": dev}}, "train_time_s": 1.0, "run_dir": run_dir, "lr": lr,
                        "trainable_params": 1, "trainable_fraction": 0.1})
        return out

    monkeypatch.setattr(script, "_run_all", fake_run_all)
    monkeypatch.setattr(tasks, "missing_offline", lambda names: [])
    args = argparse.Namespace(runs=str(tmp_path), seeds=2, steps=8, jobs=2, n_test=10, n_dev=5, routing_items=4,
                              methods=list(peak), one_lr=False, seen=None, heldout=None, model=None, section=None,
                              out=str(tmp_path))
    result = script.study(args)
    assert calls[:3] == [
        [f"sweep-{m}-lr{lr:g}-seed0" for m in peak for lr in script.LRS[m]],
        ["sweep-full-lr0.0003-seed0", "sweep-ia3-lr0.1-seed0"],  # both ends won: one more point each
        ["sweep-full-lr0.001-seed0", "sweep-ia3-lr0.3-seed0"],  # both new points won again: the last extension
    ]
    assert result["chosen"] == {"full": 3e-4, "ia3": 0.3, "lora": 1e-3}
    assert [s["lr"] for s in result["sweep"] if s["method"] == "full"] == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    assert [s["lr"] for s in result["sweep"] if s["method"] == "ia3"] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert "full-lr0.0003-seed1" in calls[3] and "ia3-lr0.3-seed1" in calls[3]


def test_paired_bootstrap_balanced_golden_values(script):
    # Identical answers: every resampled difference is 0, so the interval is [0, 0] and p = 1.
    gold = ["x"] * 8 + ["y"] * 2
    same = script.paired_bootstrap_balanced([(gold, gold[:5] + ["y"] * 5, gold[:5] + ["y"] * 5)], resamples=200)
    assert (same["diff"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    # a always right (balanced 1), b always "x" (recall x 1, y 0: balanced 0.5): the difference is 0.5 in every
    # resample that holds a y item, and 1 - 1 = 0 in one that holds none (10 draws miss both y items with
    # probability 0.8^10 = 0.107), so the interval's top is 0.5 and p = 2 x that share.
    r = script.paired_bootstrap_balanced([(gold, gold, ["x"] * 10)], resamples=4000)
    assert r["diff"] == pytest.approx(0.5) and r["high"] == pytest.approx(0.5) and r["low"] == 0.0
    assert r["p"] == pytest.approx(2 * 0.8**10, abs=0.03)
    # Plain accuracy favours b, balanced accuracy a: gold 80 x / 20 y; a gets 48 of the x and 16 of the y right
    # (accuracy 0.64, balanced (0.6 + 0.8) / 2 = 0.7), b answers x throughout (accuracy 0.8, balanced 0.5).
    gold = ["x"] * 80 + ["y"] * 20
    a = ["x"] * 48 + ["y"] * 32 + ["y"] * 16 + ["x"] * 4
    r = script.paired_bootstrap_balanced([(gold, a, ["x"] * 100)])
    assert r["diff"] == pytest.approx(0.2) and r["low"] > 0 and r["p"] < 0.05
    plain = script.paired_difference([x == g for x, g in zip(a, gold, strict=True)], [g == "x" for g in gold])
    assert plain["diff"] == pytest.approx(0.64 - 0.8)
    # Two strata average: +0.2 and 0 give +0.1.
    both = script.paired_bootstrap_balanced([(gold, a, ["x"] * 100), (gold, gold, gold)])
    assert both["diff"] == pytest.approx(0.1) and both["n"] == 200
    assert script.interval_verdict(0.01, 0.2, +1) == "reproduced"
    assert script.interval_verdict(-0.2, -0.01, +1) == "contradicted"
    assert script.interval_verdict(-0.015, 0.03, 0) == "reproduced"  # above the -0.02 margin
    assert script.interval_verdict(-0.05, -0.03, 0) == "contradicted"
    assert script.interval_verdict(-0.05, 0.01, -1) == "not resolved at this scale"
