"""benchmarks/repro/lm_distillation.py: the gate, the paired differences, the share of the teacher's lead kept and
their verdicts on made-up runs against hand-computed values, the report's table lines, and the run plumbing that needs
no training (overrides, the student's starting weights, the step-0 comparison, the arguments, --section). No
end-to-end run: even a tiny one (3 steps, 2 seeds) spawns 8 runs and takes about 40 s on a loaded machine;
tests/lab/commands/test_analyze_distill.py covers `moekit distill --init scratch --data-offset`, and the study
itself takes about 53 minutes."""

import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
T3 = 4.303  # two-sided 95 % t quantile, 2 degrees of freedom
CONFIG = {"command": "--out x", "steps": 700, "teacher_steps": 1400, "student_steps": 700, "experts": 32,
          "hard_weight": 0.75, "corpus": "mixed"}


SCRIPT = "lm_distillation"  # benchmarks/repro/lm_distillation.py, loaded by the script fixture (conftest.py)


def _row(seed, dense, teacher, control, student, **extra):
    return {"seed": seed, "dense": dense, "teacher": teacher, "control": control, "student": student, "start": 7.6,
            "start_is_dense_init": True, "fresh_batches": True, "unigram_val_loss": 6.48, "dense_parameters": 328_256,
            "teacher_parameters": 2_363_968, "dense_train_flops_per_token": 2_162_688,
            "teacher_train_flops_per_token": 2_187_264, **extra}


def _hand_rows():
    """3 seeds. Lead to keep, control - teacher: 0.30, 0.30, 0.39; the student keeps 10 %, 12 %, 14 % of it:
    student = control - 0.10 x 0.30 = 5.27, control - 0.12 x 0.30 = 5.374, control - 0.14 x 0.39 = 5.4254."""
    return [
        _row(0, dense=5.30, teacher=5.00, control=5.30, student=5.27),
        _row(1, dense=5.40, teacher=5.11, control=5.41, student=5.374),
        _row(2, dense=5.50, teacher=5.09, control=5.48, student=5.4254),
    ]


def test_gain_kept_and_where_switch_lies(script):
    # (5.0 - 4.7) / (5.0 - 4.0) = 0.3; a teacher no better than the control leaves nothing to keep.
    assert script.gain_kept(5.0, 4.0, 4.7) == pytest.approx(0.3)
    assert script.gain_kept(5.0, 5.0, 4.7) is None and script.gain_kept(5.0, 5.2, 4.7) is None
    assert script.gain_kept(5.0, 4.0, 5.1) == pytest.approx(-0.1)  # a student worse than the control: negative
    assert script.against_switch(0.12, 0.05) == "below Switch's ~30 %"  # [0.07, 0.17]
    assert script.against_switch(0.25, 0.05) == "Switch's ~30 % lies inside the interval"  # [0.20, 0.30]
    assert script.against_switch(0.40, 0.05) == "above Switch's ~30 %"
    assert script.against_switch(0.40, math.nan) == "no interval"


def test_analysis_on_hand_made_runs(script):
    stats = script.analyse({"rows": _hand_rows()})
    assert stats["seeds"] == [0, 1, 2] and stats["gate_resolved"]
    # Gate, teacher - dense: -0.30, -0.29, -0.41; mean -1.00 / 3 = -0.3333; deviations 0.0333, 0.0433, -0.0767,
    # squares sum 0.0088667, sd sqrt(0.0088667 / 2) = 0.066583, half 4.303 x 0.066583 / sqrt(3) = 0.16542.
    g = stats["gate"]
    assert g["per_seed"] == pytest.approx([-0.30, -0.29, -0.41])
    assert g["mean"] == pytest.approx(-1 / 3) and g["half"] == pytest.approx(0.16542, abs=1e-5)
    assert g["verdict"] == "reproduced"
    # Student - control: -0.03, -0.036, -0.0546; mean -0.1206 / 3 = -0.0402; deviations 0.0102, 0.0042, -0.0144,
    # squares sum 3.2904e-4, sd 0.012827, half 4.303 x 0.012827 / sqrt(3) = 0.031866: below 0, reproduced.
    c = stats["claim"]
    assert c["per_seed"] == pytest.approx([-0.03, -0.036, -0.0546])
    assert c["mean"] == pytest.approx(-0.0402) and c["half"] == pytest.approx(0.031866, abs=1e-5)
    assert c["verdict"] == "reproduced"
    # Share kept: 0.10, 0.12, 0.14; mean 0.12, sd 0.02, half 4.303 x 0.02 / sqrt(3) = 0.049687: [0.070, 0.170],
    # above 0 (reproduced) and below Switch's 0.3.
    k = stats["gain_kept"]
    assert k["per_seed"] == pytest.approx([0.10, 0.12, 0.14])
    assert k["mean"] == pytest.approx(0.12) and k["half"] == pytest.approx(T3 * 0.02 / math.sqrt(3))
    assert k["verdict"] == "reproduced" and k["against_switch"] == "below Switch's ~30 %" and k["switch"] == 0.3
    reported = {(p["a"], p["b"]): p for p in stats["reported"]}
    # Teacher - control: -0.30, -0.30, -0.39; mean -0.33, sd sqrt((0.03^2 + 0.03^2 + 0.06^2) / 2) = 0.051962,
    # half 0.12909. Dense - control: 0, -0.01, +0.02; mean 0.00333, sd 0.015275, half 0.037949. No verdicts.
    p = reported["teacher", "control"]
    assert p["mean"] == pytest.approx(-0.33) and p["half"] == pytest.approx(0.12909, abs=1e-5)
    p = reported["dense", "control"]
    assert p["mean"] == pytest.approx(0.01 / 3) and p["half"] == pytest.approx(0.037949, abs=1e-5)
    assert "verdict" not in p
    # Seed sd of the dense model: sd(5.3, 5.4, 5.5) = 0.1.
    assert stats["arms"]["dense"]["sd"] == pytest.approx(0.1)
    assert stats["all_start_at_dense_init"] and stats["all_fresh"]

    text = script.render({"config": CONFIG, "rows": _hand_rows()}, stats)
    assert text.startswith(script.HEADING + "\n")
    assert "python benchmarks/repro/lm_distillation.py --out x" in text
    assert "| arm | parameters | train FLOPs / token | seed 0 | seed 1 | seed 2 | mean ± 95 % | seed sd |" in text
    # Dense: mean 5.4, sd 0.1, half 4.303 x 0.1 / sqrt(3) = 0.24843.
    assert ("| dense D (switch-dense, 700 steps, the teacher's first batches) | 328,256 | 2,162,688 | 5.3000 | "
            "5.4000 | 5.5000 | 5.4000 ± 0.2484 | 0.1000 |") in text
    assert "| teacher T (top-1, 32 experts, dropless, 1400 steps) | 2,363,968 | 2,187,264 | 5.0000 |" in text
    assert "| student: D's initial weights, 0.75 labels + 0.25 teacher, 700 fresh batches | 328,256 |" in text
    assert ("| teacher - dense (the gate: the lead to keep) | -0.3000 | -0.2900 | -0.4100 | -0.3333 ± 0.1654 | "
            "negative (the teacher better) | reproduced |") in text
    assert ("| student - control | -0.0300 | -0.0360 | -0.0546 | -0.0402 ± 0.0319 | negative (the distilled "
            "student better than the same model trained on the labels) | reproduced |") in text
    assert "| teacher - control | -0.3000 | -0.3000 | -0.3900 | -0.3300 ± 0.1291 | - | - |" in text
    assert "| dense - control | +0.0000 | -0.0100 | +0.0200 | +0.0033 ± 0.0379 | - | - |" in text
    assert ("| gain kept | 10.0 % | 12.0 % | 14.0 % | 12.0 % ± 5.0 % | positive | reproduced | below Switch's "
            "~30 % |") in text
    assert "start at D's initial weights on every seed: yes" in text and "within one epoch): yes." in text
    assert text.rstrip().endswith("](distillation.png)")


def test_an_unresolved_gate_claims_nothing(script):
    # Teacher - dense: -0.1, +0.1, 0.0 (mean 0: not resolved), so neither the student's difference nor the share
    # gets a verdict; on seed 1 the teacher (5.5) is behind the control (5.4): its share is undefined.
    rows = [
        _row(0, dense=5.3, teacher=5.2, control=5.3, student=5.29),
        _row(1, dense=5.4, teacher=5.5, control=5.4, student=5.39, fresh_batches=False),
        _row(2, dense=5.5, teacher=5.5, control=5.6, student=5.58, start_is_dense_init=False),
    ]
    stats = script.analyse({"rows": rows})
    assert not stats["gate_resolved"] and stats["gate"]["verdict"] == "not resolved at this scale"
    assert stats["claim"]["verdict"] == script.NOT_CLAIMED
    k = stats["gain_kept"]
    # Seed 0: 0.01 / 0.1 = 0.1; seed 2: 0.02 / 0.1 = 0.2.
    assert k["per_seed"][0] == pytest.approx(0.1) and k["per_seed"][1] is None
    assert k["per_seed"][2] == pytest.approx(0.2)
    assert math.isnan(k["mean"]) and k["verdict"].startswith("undefined") and "seed 1" in k["verdict"]
    assert not stats["all_fresh"] and not stats["all_start_at_dense_init"]
    text = script.render({"config": CONFIG, "rows": rows}, stats)
    assert "| gain kept | 10.0 % | undefined | 20.0 % | - | positive | undefined (the teacher is no better " in text
    assert f"| {script.NOT_CLAIMED} |" in text and "NO (see runs.csv)" in text
    # Resolved gate, all shares defined, the teacher's lead not kept at all: a share below 0 is contradicted.
    rows = [_row(s, dense=5.3 + s / 10, teacher=5.0 + s / 10, control=5.3 + s / 10,
                 student=5.3 + s / 10 + (0.03, 0.04, 0.05)[s]) for s in range(3)]
    stats = script.analyse({"rows": rows})
    assert stats["claim"]["verdict"] == "contradicted" and stats["gain_kept"]["verdict"] == "contradicted"
    assert stats["gain_kept"]["mean"] == pytest.approx(-0.4 / 3)  # -0.03, -0.04, -0.05 of a 0.3 lead


def test_runs_are_set_up_as_the_design_says(script):
    from moekit.distill.student import student_config
    from moekit.lab.training.run_config import load_run_config
    from moekit.models import TransformerLM

    class Args:
        corpus, max_chars = "mixed", None

    teacher = script.train_overrides(3, 1400, Args(), moe=True)
    assert "moe.capacity_factor='none'" in teacher and "train.seed=3" in teacher and "train.max_steps=1400" in teacher
    assert "train.eval_batches='none'" in teacher and "data.corpus='mixed'" in teacher
    assert not any(o.startswith("moe.") for o in script.train_overrides(3, 700, Args(), moe=False))
    assert "train.max_steps=700" in script.distill_overrides(700)
    assert not any("seed" in o for o in script.distill_overrides(700))  # the student keeps the teacher's seed
    # The student of the e32 teacher is D's architecture and, built after torch.manual_seed(s) as moekit distill
    # and moekit train both build it, has D's initial weights.
    t_cfg = load_run_config(str(script.teacher_config(32)), teacher).model
    d_cfg = load_run_config(str(script.DENSE), script.train_overrides(3, 700, Args(), moe=False)).model
    torch.manual_seed(3)
    student = TransformerLM(student_config(t_cfg)).state_dict()
    torch.manual_seed(3)
    dense = TransformerLM(d_cfg).state_dict()
    assert student.keys() == dense.keys() and all(torch.equal(student[k], dense[k]) for k in student)


def test_same_start_compares_step_0_weights(script, tmp_path):
    from safetensors.torch import save_file

    def run(name, value):
        d = tmp_path / name / "checkpoints" / "step_00000000"
        d.mkdir(parents=True)
        save_file({"w": torch.full((2, 2), value)}, str(d / "model.safetensors"))
        return tmp_path / name

    a, b, c = run("a", 1.0), run("b", 1.0), run("c", 2.0)
    assert script.same_start(a, b) is True and script.same_start(a, c) is False
    assert script.same_start(a, tmp_path / "none") is None


def test_arguments_and_section(script, tmp_path):
    args = script.parse_args(["--out", "x"])
    assert (args.seeds, args.steps, args.teacher_steps, args.student_steps, args.experts) == (5, 700, 1400, 700, 32)
    assert args.hard_weight == 0.75 and args.corpus == "mixed" and args.jobs == 2
    args = script.parse_args(["--out", "x", "--steps", "10", "--student-steps", "5"])
    assert (args.teacher_steps, args.student_steps) == (20, 5)
    out = tmp_path / "docs" / "results" / "lm"
    out.mkdir(parents=True)
    (out / "results.md").write_text(script.HEADING + "\n\nnew text\n\n![plot](distillation.png)\n")
    results_md = tmp_path / "docs" / "RESULTS.md"
    results_md.write_text("# Results\n\n" + script.HEADING + "\n\nold\n\n## Next\n\nkept\n")
    assert script.main(["--out", str(out), "--section", str(results_md)]) == 0
    text = results_md.read_text()
    assert "new text" in text and "old" not in text and "## Next\n\nkept" in text
    assert "](results/lm/distillation.png)" in text

