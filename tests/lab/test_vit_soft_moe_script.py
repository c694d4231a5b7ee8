"""benchmarks/repro/vit_soft_moe.py: the arms' configs (49 tokens, equal FLOPs, Soft MoE's scale), what a run's
records become, and paired differences, the capacity check, verdicts and the report on made-up runs against
hand-computed values (the study itself takes about an hour)."""

import math

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = "vit_soft_moe"  # benchmarks/repro/vit_soft_moe.py, loaded by the script fixture (conftest.py)


def test_arms_have_49_tokens_7_experts_and_equal_flops(script):
    from moekit.lab.training.run_config import load_run_config
    from moekit.layers.config import SoftMoEConfig
    from moekit.models.vit import vit_flops_per_image

    models = {a: load_run_config(script.config_of(a)).model for a in script.ARMS}
    flops = {a: vit_flops_per_image(m)["train"] for a, m in models.items()}
    for a, m in models.items():
        assert m.num_tokens == 49 and m.d_model == 40
        assert abs(flops[a] / flops["dense"] - 1) < 0.015, a  # within 1.5 % of dense, routers included
        if a != "dense":
            assert m.moe.num_experts == 7 and m.moe_block_indices() == [2, 3]
    soft = models["soft"].moe
    assert isinstance(soft, SoftMoEConfig) and soft.num_experts * soft.slots_per_expert == 35
    assert soft.router_scale_init == pytest.approx(math.sqrt(40))
    assert script.soft_scale_init() == pytest.approx(math.sqrt(40))
    assert script.uniform_entropy("soft") == pytest.approx(math.log(35))
    assert script.uniform_entropy("top2") == pytest.approx(math.log(7))
    assert script.uniform_entropy("dense") is None


def test_epochs_logging_and_overrides(script):
    # 60,000 / 128 = 468.75 -> 469 steps an epoch = 7 x 67, so logging every 7 steps lands on every evaluation.
    assert script.epoch_steps(None) == 469 and script.log_every_for(469) == 7
    assert script.epoch_steps(640) == 5 and script.log_every_for(5) == 5 and script.log_every_for(11) == 1
    args = type("A", (), {"train_examples": None, "test_examples": 500, "epochs": 10})()
    ov = script.overrides(2, args)
    assert "train.max_steps=4690" in ov and "train.eval_every=469" in ov and "train.log_every=7" in ov
    assert "data.test_examples=500" in ov and "train.seed=2" in ov
    assert not any(o.startswith("data.train_examples") for o in ov)
    # thin keeps about n points, evenly spaced, and always the last.
    assert script.thin(list(range(10)), 4) == [0, 3, 6, 9]
    assert script.thin(list(range(11)), 4) == [0, 3, 6, 9, 10]
    assert script.thin([1, 2], 4) == [1, 2]


def test_row_of_a_run_and_the_learned_scale(script, tmp_path):
    # An epoch of 4 steps, 2 epochs, records every 2 steps, evaluations at 4 and 8; the last epoch's steps are 6
    # and 8: training loss at the end (0.5 + 0.3) / 2 = 0.4; entropy 3.0 at the first record, (2.6 + 2.4) / 2 = 2.5
    # over the last epoch.
    records = [
        {"step": 2, "ce_loss": 1.0, "router_entropy": 3.0, "max_router_logit": 1.0, "drop_fraction": 0.0},
        {"step": 4, "ce_loss": 0.8, "router_entropy": 2.8, "max_router_logit": 2.0, "drop_fraction": 0.0,
         "val_loss": 0.9, "val_accuracy": 0.6},
        {"step": 6, "ce_loss": 0.5, "router_entropy": 2.6, "max_router_logit": 3.0, "drop_fraction": 0.0},
        {"step": 8, "ce_loss": 0.3, "router_entropy": 2.4, "max_router_logit": 5.0, "drop_fraction": 0.0,
         "val_loss": 0.7, "val_accuracy": 0.7},
    ]
    ckpt = tmp_path / "checkpoints" / "step_00000008"
    ckpt.mkdir(parents=True)
    save_file({"blocks.3.ffn.router.scale": torch.tensor(7.5), "blocks.2.ffn.router.scale": torch.tensor(6.5),
               "blocks.2.ffn.router.phi": torch.zeros(2, 1, 1)}, str(ckpt / "model.safetensors"))
    run = {"run_dir": str(tmp_path), "records": records,
           "summary": {"steps": 8, "final_val_loss": 0.7, "final_val_accuracy": 0.7, "parameters_total": 10}}
    row = script.row_of("soft", 1, run, 4, math.log(35))
    assert (row["test_loss"], row["test_accuracy"], row["previous_test_loss"]) == (0.7, 0.7, 0.9)
    assert row["train_loss_end"] == pytest.approx(0.4)
    assert row["entropy_start"] == 3.0 and row["entropy_end"] == pytest.approx(2.5)
    assert row["max_logit_end"] == pytest.approx(4.0)
    assert row["evals"] == [[4, 0.9, 0.6], [8, 0.7, 0.7]]
    assert row["scales"] == [6.5, 7.5]  # block order
    # Other arms read no scale; a run directory without checkpoints has none.
    assert script.row_of("top1", 1, run, 4, math.log(7))["scales"] is None
    assert script.learned_scales(tmp_path / "nowhere") is None


def _hand_result():
    """3 seeds; a seed effect of 0.01 per seed on dense (loss 0.30 + s / 100, accuracy 0.88 + s / 100) that pairing
    removes. Soft MoE minus each arm, loss: dense -0.02 on every seed; top-1 +0.01, -0.01, 0; top-2 +0.01 every
    seed; expert choice -0.04, -0.03, -0.02. Accuracy: dense +0.005; top-1 0; top-2 -0.004; expert choice +0.001,
    +0.003, +0.002."""
    rows = []
    for s in range(3):
        dense_loss, dense_acc = 0.30 + s / 100, 0.88 + s / 100
        soft_loss, soft_acc = dense_loss - 0.02, dense_acc + 0.005
        loss = {"dense": dense_loss, "soft": soft_loss, "top1": soft_loss - (0.01, -0.01, 0.0)[s],
                "top2": soft_loss - 0.01, "ec": soft_loss + (0.04, 0.03, 0.02)[s]}
        acc = {"dense": dense_acc, "soft": soft_acc, "top1": soft_acc, "top2": soft_acc + 0.004,
               "ec": soft_acc - (0.001, 0.003, 0.002)[s]}
        for a in ("dense", "top1", "top2", "ec", "soft"):
            moe = a != "dense"
            rows.append({
                "arm": a, "seed": s, "test_loss": loss[a], "test_accuracy": acc[a],
                # dense: training loss 0.9 of the test loss; the MoE arms 0.05 below dense's.
                "train_loss_end": 0.9 * dense_loss - (0.05 if moe else 0.0),
                "previous_test_loss": loss[a] + 0.003,
                "entropy_start": 3.2 if a == "soft" else (1.9 if moe else None),
                "entropy_end": 3.0 if a == "soft" else (1.8 if moe else None),
                "entropy_uniform": math.log(35) if a == "soft" else (math.log(7) if moe else None),
                "max_logit_end": 4.0 if moe else None,
                "mean_drop_fraction": 0.1 if a in ("top1", "top2", "ec") else 0.0,
                "scales": [6.5 + s / 10, 7.0] if a == "soft" else None,
                "parameters_total": 80570 if a == "dense" else 234730,
                "parameters_active": 80570 if a == "dense" else 81130,
                "train_flops_per_image": 27379680 if a == "dense" else 27544320,
                "evals": [[469, loss[a] + 0.2, acc[a] - 0.1], [938, loss[a], acc[a]]],
                "entropy": [[7, 3.2], [938, 3.0]] if a == "soft" else ([[7, 1.9], [938, 1.8]] if moe else []),
            })
    timing = {a: {"median_s": t, "q25_s": t - 0.001, "q75_s": t + 0.001, "n": 30, "cpu_median_s": t}
              for a, t in (("dense", 0.1), ("top1", 0.11), ("top2", 0.125), ("ec", 0.112), ("soft", 0.11))}
    config = {"command": "--out x", "epochs": 2, "steps": 938, "test_images": 10_000}
    return {"config": config, "rows": rows, "timing": timing}


HALF = 4.303 * 0.01 / math.sqrt(3)  # the 95 % half-width of three values with standard deviation 0.01: 0.024844


def test_claims_are_paired_by_seed(script):
    stats = script.analyse(_hand_result())
    c = {(x["b"], x["metric"]): x for x in stats["claims"]}
    assert len(c) == 8
    # Loss. dense: -0.02 every seed, width 0: reproduced.
    assert c["dense", "test_loss"]["mean"] == pytest.approx(-0.02)
    assert c["dense", "test_loss"]["half"] == pytest.approx(0.0, abs=1e-9)
    assert c["dense", "test_loss"]["verdict"] == "reproduced"
    # top-1: +0.01, -0.01, 0: mean 0, sd 0.01, half 0.0248.
    assert c["top1", "test_loss"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert c["top1", "test_loss"]["half"] == pytest.approx(HALF)
    assert c["top1", "test_loss"]["verdict"] == "not resolved at this scale"
    # top-2: +0.01 every seed: the interval excludes 0 on the wrong side.
    assert c["top2", "test_loss"]["verdict"] == "contradicted"
    # expert choice: -0.04, -0.03, -0.02: mean -0.03 +- 0.0248 = [-0.0548, -0.0052]: reproduced.
    assert c["ec", "test_loss"]["mean"] == pytest.approx(-0.03)
    assert c["ec", "test_loss"]["half"] == pytest.approx(HALF)
    assert c["ec", "test_loss"]["verdict"] == "reproduced"
    # Accuracy (paper's side positive): +0.005 every seed reproduced; 0 every seed (width 0) not resolved; -0.004
    # contradicted; +0.001, +0.003, +0.002 = 0.002 +- 4.303 x 0.001 / sqrt(3) = 0.0024844: not resolved.
    assert c["dense", "test_accuracy"]["verdict"] == "reproduced"
    assert c["top1", "test_accuracy"]["verdict"] == "not resolved at this scale"
    assert c["top2", "test_accuracy"]["verdict"] == "contradicted"
    assert c["ec", "test_accuracy"]["mean"] == pytest.approx(0.002)
    assert c["ec", "test_accuracy"]["half"] == pytest.approx(HALF / 10)
    assert c["ec", "test_accuracy"]["verdict"] == "not resolved at this scale"
    # The seed effect (0.01 per seed) is the seed standard deviation of an arm.
    assert stats["seed_sd"]["test_loss"]["dense"] == pytest.approx(0.01)
    assert stats["means"]["test_loss"]["dense"] == pytest.approx((0.31, HALF))
    # Binomial standard error at the dense mean accuracy 0.89: sqrt(0.89 x 0.11 / 10,000) = sqrt(9.79e-6) = 0.0031289.
    assert stats["binomial_se"] == pytest.approx(0.0031289, abs=1e-6)


def test_capacity_check_diagnostics_and_time_ratios(script):
    stats = script.analyse(_hand_result())
    cap = stats["capacity"]
    # (a) training loss 0.9 x the test loss on every seed: ratio 0.9 >= 0.8.
    assert cap["ratio"][0] == pytest.approx(0.9) and cap["ratio_ok"]
    # (b) the last epoch gained 0.003 nats: relative 0.003 x (1/0.30 + 1/0.31 + 1/0.32) / 3 = 0.0096841 < 0.02.
    assert cap["last_gain"][0] == pytest.approx(0.003)
    assert cap["relative_gain"][0] == pytest.approx(0.0096841, abs=1e-6) and cap["gain_ok"] and cap["limited"]
    # (c) every MoE arm's training loss 0.05 below dense's.
    assert [c["a"] for c in cap["moe_minus_dense_train"]] == ["top1", "top2", "ec", "soft"]
    assert all(c["mean"] == pytest.approx(-0.05) for c in cap["moe_minus_dense_train"])
    # Soft MoE's scale: block 2 6.5, 6.6, 6.7 = 6.6 +- 4.303 x 0.1 / sqrt(3) = 0.24844; block 3 7.0 on every seed.
    (m2, h2), (m3, h3) = stats["soft_scales"]
    assert (m2, h2) == pytest.approx((6.6, 10 * HALF)) and (m3, h3) == pytest.approx((7.0, 0.0))
    assert stats["routing"]["soft"]["end"][0] == pytest.approx(3.0)
    assert stats["routing"]["soft"]["uniform"] == pytest.approx(math.log(35))
    assert stats["time_ratios"]["soft"] == pytest.approx(1.1) and stats["time_ratios"]["top2"] == pytest.approx(1.25)
    # Curves: at step 938 the mean test loss of dense is 0.31 (0.30, 0.31, 0.32).
    assert stats["loss_curves"]["dense"][-1][:2] == pytest.approx([938, 0.31])
    assert stats["entropy_curve"] == [[7, pytest.approx(3.2), 0.0], [938, pytest.approx(3.0), 0.0]]
    # A failed check: training loss half the test loss (over-fitting).
    result = _hand_result()
    for r in result["rows"]:
        if r["arm"] == "dense":
            r["train_loss_end"] = 0.5 * r["test_loss"]
    cap = script.analyse(result)["capacity"]
    assert not cap["ratio_ok"] and not cap["limited"]


def test_report_lines_and_plot(script, tmp_path):
    result = _hand_result()
    stats = script.analyse(result)
    text = script.render(result, stats)
    assert text.startswith(script.HEADING + "\n")
    # dense: loss 0.31 +- 0.0248, sd 0.01; accuracy 0.89 +- 0.0248, sd 0.01; no drops; step time / dense 1.00.
    assert ("| dense | 80,570 / 80,570 | 27.38 | 0.3100 ± 0.0248 | 0.0100 | 0.8900 ± 0.0248 | 0.0100 | - | 1.00 |"
            in text)
    assert "| Soft MoE, 7 x 5 slots | 234,730 / 81,130 | 27.54 | 0.2900 ± 0.0248 |" in text
    assert ("| Soft MoE - dense | test loss | -0.0200 ± 0.0000 | -0.0200, -0.0200, -0.0200 | negative (Soft MoE "
            "lower) | reproduced |") in text
    assert ("| Soft MoE - expert choice, c = 1 | test loss | -0.0300 ± 0.0248 | -0.0400, -0.0300, -0.0200 | "
            "negative (Soft MoE lower) | reproduced |") in text
    assert "| Soft MoE - top-2, CF 1.25 | test accuracy | -0.0040 ± 0.0000 |" in text
    prose = " ".join(text.split())  # paragraphs are wrapped at 118 characters
    # Relative gains 0.003 / 0.30, 0.31, 0.32 = 1.0000, 0.9677, 0.9375 %: mean 0.9684, sd 0.0313, half 4.303 x
    # 0.0313 / sqrt(3) = 0.078.
    assert "ratio 0.900 ± 0.000 (yes)" in prose and "0.97 ± 0.08 % (yes;" in prose
    assert "Both: plausibly capacity-limited." in prose
    assert "| top-1, CF 1.25 | -0.0500 ± 0.0000 |" in text
    assert "| Soft MoE, 7 x 5 slots | 3.200 ± 0.000 | 3.000 ± 0.000 | 3.555 | 4.00 ± 0.00 |" in text
    assert "block 2: 6.60 ± 0.25, block 3: 7.00 ± 0.00" in prose and "(initialised to 6.32)" in prose
    assert "| top-2, CF 1.25 | 125.0 (124.0-126.0) | 1.25 | 125.0 |" in text
    assert f"![{script.PLOT_ALT}]({script.PLOT})" in text
    assert "binomial standard error of one run's accuracy on 10,000 test images at the dense mean is 0.0031" in prose
    script.plot(stats, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
