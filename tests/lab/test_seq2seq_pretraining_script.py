"""benchmarks/repro/seq2seq_pretraining.py: the pairs are FLOP-matched by construction, steps-to-quality
interpolates, the paired statistics and verdicts follow the standard, and --section replaces its own section only."""

import argparse
import json
import math

import pytest

SCRIPT = "seq2seq_pretraining"  # benchmarks/repro/seq2seq_pretraining.py, loaded by the script fixture (conftest.py)


def _args(**kw):
    values = dict(steps=300, eval_every=25, max_chars=None, seeds=3, timing_rounds=0, runs="/tmp/x", out="/tmp/y",
                  section=None, notes=None)
    values.update(kw)
    return argparse.Namespace(**values)


def test_configs_are_flop_matched_with_one_schedule(script):
    cfgs = script.base_configs(_args())
    assert set(cfgs) == set(script.ARMS)
    for sparse, dense in script.PAIRS:
        f_sparse = cfgs[sparse].task.cost(cfgs[sparse].model, cfgs[sparse]).train_flops_per_token
        f_dense = cfgs[dense].task.cost(cfgs[dense].model, cfgs[dense]).train_flops_per_token
        assert f_sparse == pytest.approx(f_dense, rel=0.01)  # the router is the difference
    assert len({(c.train.lr, c.train.warmup_steps, c.train.max_steps, c.train.schedule) for c in cfgs.values()}) == 1


def test_steps_to_interpolates_and_statistics(script):
    curve = [(25, 6.0), (50, 5.0), (75, 4.0)]
    assert script.steps_to(curve, 4.5) == pytest.approx(62.5)
    assert script.steps_to(curve, 6.5) == 25.0
    assert script.steps_to(curve, 3.9) is None
    m, h = script.interval([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert script.verdict(-1.0, 0.5) == "reproduced"
    assert script.verdict(1.0, 0.5) == "contradicted"
    assert script.verdict(0.2, 0.5) == "not resolved at this scale"
    assert script.verdict(0.6, 0.3, null=1.0) == "reproduced"


def test_analyse_and_section(script, tmp_path):
    rows = []
    for seed in range(3):
        for arm, final in (("switch", 4.0), ("t5_dense", 4.2), ("stmoe", 4.1), ("stmoe_dense", 4.0)):
            final += 0.01 * seed
            curve = [(100, final + 1.0), (200, final + 0.3), (300, final)]
            rows.append({"seed": seed, "arm": arm, "steps": 300, "final_val_loss": final, "curve": curve,
                         "train_flops_per_token": 4.4e7, "parameters_total": 1, "parameters_active": 1,
                         "input_tokens": 614400, "target_tokens": 139200, "step_time_median_s": 0.5,
                         "train_time_s": 150.0, "drop_fraction_last50": None, "run_dir": "x"})
    result = script.write_results(rows, None, tmp_path, _args(), "cmd")
    sw = result["paired"]["switch - t5_dense"]
    assert sw["mean"] == pytest.approx(-0.2) and sw["verdict"] == "reproduced"
    st = result["paired"]["stmoe - stmoe_dense"]
    assert st["mean"] == pytest.approx(0.1) and st["verdict"] == "contradicted"
    ratio = result["steps_ratio"]["switch / t5_dense"]
    assert ratio["dense_steps"] == [300.0] * 3 and all(r < 1 for r in ratio["per_seed"])
    assert result["steps_ratio"]["stmoe / stmoe_dense"]["mean"] is None  # never reaches the dense final loss
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1, 2]
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Before\n\ntext\n\n" + script.SECTION + "\n\nold\n\n## After\n\nkept\n")
    script.write_section(md, tmp_path)
    text = md.read_text()
    assert "old" not in text and "## Before\n\ntext" in text and text.endswith("## After\n\nkept\n")
    assert text.count(script.SECTION) == 1 and "**reproduced**" in text and "**contradicted**" in text
