"""benchmarks/repro/token_specialisation.py: the routing figures on hand-made tokens (arithmetic in comments), the
load-matched hash null, the paired differences and verdicts on made-up rows, and the routing read from a tiny trained
run's final and step-0 checkpoints (the study itself takes about half an hour)."""

import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
LN2 = math.log(2)
ROUTINGS = ("trained", "untrained", "hash")


SCRIPT = "token_specialisation"  # benchmarks/repro/token_specialisation.py, loaded by the script fixture (conftest.py)


def test_routing_figures_hand_computed(script):
    # Two windows of 4: tokens 5 5 5 5 | 7 7 7 7, experts 0 0 0 1 | 1 1 1 1 (N = 8).
    tokens_N = np.array([5, 5, 5, 5, 7, 7, 7, 7])
    position_N = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    expert_N = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    f = script.routing_figures(tokens_N, position_N, expert_N)
    # Joint (5,0) 3/8, (5,1) 1/8, (7,1) 4/8; p(token) 1/2, 1/2; p(expert) 3/8, 5/8:
    # MI = 3/8 log2((3/8)/(3/16)) + 1/8 log2((1/8)/(5/16)) + 1/2 log2((1/2)/(5/16))
    #    = 0.375 - 0.125 x 1.321928 + 0.5 x 0.678072 = 0.548795 bits.
    # Miller-Madow: 3 cells - 2 tokens - 2 experts + 1 = 0, no correction.
    assert f["mi_plugin_bits"] == pytest.approx(0.548795, abs=1e-6)
    assert f["mi_bits"] == pytest.approx(f["mi_plugin_bits"])
    # H(expert) = 3/8 log2(8/3) + 5/8 log2(8/5) = 0.530639 + 0.423795 = 0.954434; corrected + (2 - 1) / (16 ln 2)
    # = 0.954434 + 0.090168 = 1.044602; share 0.548795 / 1.044602 = 0.525362.
    assert f["expert_entropy_bits"] == pytest.approx(0.954434, abs=1e-6)
    assert f["determined_share"] == pytest.approx(0.548795 / 1.044602, abs=1e-6)
    # Previous token (positions 1-3 of each window): prev 5 5 5 | 7 7 7, experts 0 0 1 | 1 1 1.
    # Joint (5,0) 2/6, (5,1) 1/6, (7,1) 3/6; p(prev) 1/2, 1/2; p(expert) 1/3, 2/3:
    # MI = 1/3 log2(2) + 1/6 log2(1/2) + 1/2 log2(3/2) = 1/3 - 1/6 + 0.292481 = 0.459148; 3 - 2 - 2 + 1 = 0.
    assert f["prev_mi_bits"] == pytest.approx(0.459148, abs=1e-6)
    # Position: positions 0, 1, 2 each see experts 0 and 1 once, position 3 sees 1 twice; p(position) 1/4:
    # plug-in = 3 x [1/8 log2(4/3) + 1/8 log2(4/5)] + 1/4 log2(8/5) = 3 x 0.011639 + 0.169518 = 0.204434;
    # 7 cells - 4 positions - 2 experts + 1 = 2: minus 2 / (16 ln 2) = 0.180337, so 0.024097.
    assert f["position_mi_bits"] == pytest.approx(0.204434 - 2 / (16 * LN2), abs=1e-6)


def test_hash_null_keeps_the_loads_and_is_a_function_of_the_token(script):
    # Ten distinct ids, each once; trained loads 6, 2, 0, 2 of 4 experts: every hash has exactly these loads, so its
    # MI is H(expert) = 0.6 log2(1/0.6) + 2 x 0.2 log2(5) = 0.442179 + 0.928771 = 1.370951 bits (plug-in), and
    # corrected (one cell per id: 10 - 10 - 3 + 1 = -2) 1.370951 + 2 / (20 ln 2) = 1.370951 + 0.144270 = 1.515221.
    tokens_N = np.arange(100, 110)
    trained_N = np.array([0, 0, 0, 0, 0, 0, 1, 1, 3, 3])
    h = script.hash_figures(tokens_N, np.arange(10), trained_N, 4, 5, np.random.default_rng(0))
    assert h["load_deviation"] == 0.0
    assert h["mi_plugin_bits"] == pytest.approx(1.370951, abs=1e-6)
    assert h["expert_entropy_bits"] == pytest.approx(1.370951, abs=1e-6)
    assert h["mi_bits"] == pytest.approx(1.370951 + 2 / (20 * LN2), abs=1e-6)
    assert h["determined_share"] == pytest.approx(1.0)

    # Repeated ids (200 ids, Zipf-like counts) and a trained routing that ignores the token: each hash sends every
    # id to one expert (plug-in MI = H(expert)), its loads match the trained ones up to the ids that straddle a cut,
    # and the trained MI stays below the hash's, the ceiling for its loads.
    rng = np.random.default_rng(1)
    tokens_N = rng.choice(200, size=5000, p=(w := 1 / np.arange(1, 201)) / w.sum())
    trained_N = rng.choice(8, size=5000, p=[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
    position_N = np.tile(np.arange(50), 100)
    row = script.layer_row(tokens_N, position_N, trained_N, trained_N, 8, 10, np.random.default_rng(2))
    assert row["hash_mi_plugin_bits"] == pytest.approx(row["hash_expert_entropy_bits"])
    assert row["hash_load_deviation"] <= np.bincount(tokens_N).max() / 5000
    # (The most frequent id alone is 1 / H_200 = 17 % of the tokens, so the loads, and H(expert), match only roughly.)
    assert row["hash_expert_entropy_bits"] == pytest.approx(row["trained_expert_entropy_bits"], abs=0.1)
    # The plug-in MI of the token-blind routing, about (200 - 1)(8 - 1) / (2 x 5000 x ln 2) = 0.20 bits, is all bias;
    # Miller-Madow removes part of it (the rare ids keep some), and the half-sample drift sees what is left.
    assert 0 < row["trained_mi_bits"] < row["trained_mi_plugin_bits"] and row["trained_mi_drift_bits"] > 0
    assert row["trained_mi_bits"] < row["hash_mi_bits"] - 2
    assert row["untrained_mi_bits"] == row["trained_mi_bits"] and row["tokens"] == 5000
    assert row["distinct_tokens"] == len(np.unique(tokens_N)) and row["hash_draws"] == 10
    # Seeded: the same generator seed gives the same hashes.
    again = script.layer_row(tokens_N, position_N, trained_N, trained_N, 8, 10, np.random.default_rng(2))
    assert again == row


def _hand_rows(swap: bool = False) -> list[dict]:
    """3 seeds x blocks 1 and 3. Trained MI: block 1 1.5, 1.6, 1.7; block 3 1.0, 0.9, 1.2. Untrained: block 1 1.0,
    block 3 0.9, 1.0, 0.9. Hash: 2.5 and 2.0. Plug-in: trained + 0.1, untrained + 0.2, hash + 0; drift a quarter of
    that. ``swap``: trained and untrained exchanged."""
    trained = {1: [1.5, 1.6, 1.7], 3: [1.0, 0.9, 1.2]}
    untrained = {1: [1.0, 1.0, 1.0], 3: [0.9, 1.0, 0.9]}
    if swap:
        trained, untrained = untrained, trained
    rows = []
    for s in range(3):
        for b in (1, 3):
            mi = {"trained": trained[b][s], "untrained": untrained[b][s], "hash": 2.5 if b == 1 else 2.0}
            plus = {"trained": 0.1, "untrained": 0.2, "hash": 0.0}
            row = {"seed": s, "block": b, "tokens": 32768, "distinct_tokens": 1700, "hash_load_deviation": 0.01 * s,
                   "final_val_loss": 5.0 + s / 10, "unigram_val_loss": 6.4}
            for r in ROUTINGS:
                row |= {f"{r}_mi_bits": mi[r], f"{r}_mi_plugin_bits": mi[r] + plus[r],
                        f"{r}_mi_drift_bits": plus[r] / 4, f"{r}_expert_entropy_bits": 2.6,
                        f"{r}_determined_share": mi[r] / 2.6, f"{r}_prev_mi_bits": 0.3, f"{r}_position_mi_bits": 0.01}
            rows.append(row)
    return rows


def test_analysis_and_verdicts_on_hand_made_rows(script):
    assert script.ROUTINGS == ROUTINGS
    stats = script.analyse({"rows": _hand_rows()})
    claims = {(c["null"], c["scope"]): c for c in stats["claims"]}
    assert stats["scopes"] == ["block 1", "block 3", "mean of layers"]
    # Block 1, trained - untrained: 0.5, 0.6, 0.7: mean 0.6, sd 0.1, half 4.303 x 0.1 / sqrt(3) = 0.248434 > 0.
    c = claims["untrained", "block 1"]
    assert c["per_seed"] == pytest.approx([0.5, 0.6, 0.7]) and c["mean"] == pytest.approx(0.6)
    assert c["half"] == pytest.approx(0.248434, abs=1e-6) and c["verdict"] == "reproduced"
    # The plug-in difference is 0.1 lower on every seed (the untrained plug-in is inflated by 0.2, trained by 0.1).
    assert c["plugin"][0] == pytest.approx(0.5) and c["plugin"][1] == pytest.approx(0.248434, abs=1e-6)
    # Block 3: 0.1, -0.1, 0.3: mean 0.1, sd 0.2, half 4.303 x 0.2 / sqrt(3) = 0.496868: not resolved.
    c = claims["untrained", "block 3"]
    assert c["mean"] == pytest.approx(0.1) and c["half"] == pytest.approx(0.496868, abs=1e-6)
    assert c["verdict"] == "not resolved at this scale"
    # Mean of the layers per seed: (0.5 + 0.1) / 2 = 0.3, 0.25, 0.5: mean 0.35, sd sqrt((0.05^2 + 0.1^2 + 0.15^2) / 2)
    # = 0.132288, half 4.303 x 0.132288 / sqrt(3) = 0.328647 < 0.35: reproduced.
    c = claims["untrained", "mean of layers"]
    assert c["per_seed"] == pytest.approx([0.3, 0.25, 0.5]) and c["half"] == pytest.approx(0.328647, abs=1e-6)
    assert c["verdict"] == "reproduced"
    # Trained - hash: block 1 -1.0, -0.9, -0.8; no paper side, so no verdict.
    c = claims["hash", "block 1"]
    assert c["mean"] == pytest.approx(-0.9) and c["verdict"] == "-"
    # Share of the hash: 1.5 / 2.5, 1.6 / 2.5, 1.7 / 2.5 = 0.6, 0.64, 0.68: mean 0.64, half 4.303 x 0.04 / sqrt(3).
    assert stats["share_of_hash"]["block 1"][0] == pytest.approx(0.64)
    assert stats["share_of_hash"]["block 1"][1] == pytest.approx(4.303 * 0.04 / math.sqrt(3))
    # Trained MI, mean of the layers per seed: (1.5 + 1.0) / 2, (1.6 + 0.9) / 2, (1.7 + 1.2) / 2 = 1.25, 1.25, 1.45.
    assert stats["figures"]["mean of layers"]["trained"]["mi_bits"][0] == pytest.approx((1.25 + 1.25 + 1.45) / 3)
    assert stats["seed_sd"]["final_val_loss"] == pytest.approx(0.1)
    assert stats["val_loss"][0] == pytest.approx(5.1) and stats["hash_load_deviation"] == pytest.approx(0.02)

    # Untrained above trained on every seed of block 1: contradicted.
    swapped = script.analyse({"rows": _hand_rows(swap=True)})
    assert {(c["null"], c["scope"]): c for c in swapped["claims"]}["untrained", "block 1"]["verdict"] == "contradicted"

    config = {"command": "--out x", "steps": 1500, "corpus": "mixed", "hash_draws": 20}
    text = script.render({"config": config, "rows": _hand_rows()}, stats)
    assert text.startswith(script.HEADING + "\n")
    assert ("| trained - untrained | block 1 | +0.6000 ± 0.2484 | +0.5000 ± 0.2484 | positive (training specialises "
            "routing by token) | reproduced |") in text
    assert "| trained - hash | block 1 | -0.9000 ± 0.2484 | -0.8000 ± 0.2484 | none | - |" in text
    assert "| block 1 | trained | 2.600 ± 0.000 | 1.6000 ± 0.2484 | 1.7000 ± 0.2484 | +0.0250 ± 0.0000 |" in text
    assert "](mi.png)" in text


def test_outputs_and_section(script, tmp_path):
    # The files of --out from hand-made rows, then --section puts results.md into a RESULTS.md elsewhere, its plot
    # linked from there, and keeps the rest of that file.
    out = tmp_path / "out"
    config = {"command": "--out out", "steps": 1500, "corpus": "mixed", "hash_draws": 20}
    script.write({"config": config, "rows": _hand_rows()}, out)
    for name in ("results.json", "runs.csv", "results.md", "mi.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "runs.csv").read_text().count("\n") == 1 + 6  # a header, 3 seeds x 2 layers
    results_md = tmp_path / "docs" / "RESULTS.md"
    results_md.parent.mkdir()
    results_md.write_text("# Results\n\n## Another study\n\ntext\n")
    assert script.main(["--out", str(out), "--section", str(results_md)]) == 0
    text = results_md.read_text()
    assert text.startswith("# Results\n\n## Another study\n\ntext\n\n" + script.HEADING)
    assert "](../out/mi.png)" in text


def test_routing_of_a_tiny_run_from_its_final_and_step_0_checkpoints(script, tmp_path):
    import torch

    import moekit.lab
    from moekit.analysis.trace import iter_windows, trace_model
    from moekit.lab.analysis.pipeline import untrained_model
    from moekit.lab.training.run import load_trained_run
    from moekit.routing.topk import TopKRouter

    words = "the cat sat on a mat and the dog ran to the red rug then it was very happy".split()
    rng = np.random.default_rng(0)
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(400)))
    run_dir = tmp_path / "run"
    moekit.lab.train("switch-tiny", run_dir, {
        "data.corpus": str(tmp_path / "c.txt"), "data.vocab_size": 300, "data.seq_len": 16,
        "data.piece_chars": 256, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64,
        "train.max_steps": 4, "train.batch_size": 4, "train.eval_every": 4, "train.checkpoint_every": 0,
        "train.warmup_steps": 1, "train.lr": 0.05, "train.progress": "off", "train.threads": 1})
    assert (run_dir / "checkpoints" / script.INITIAL).is_dir()
    rows = script.token_routing(str(run_dir), 64, 3, 0)

    # Independently: the final weights' routing and the untrained model's (the run's config and seed, as moekit
    # train builds it) of the same 4 x 16 validation tokens.
    run = load_trained_run(run_dir)
    batches = list(iter_windows(run.data.val_tokens, 16, 4, 64))
    trained = trace_model(run.model, batches)
    untrained = trace_model(untrained_model(run), batches)
    assert [r["block"] for r in rows] == trained.layer_blocks and all(r["step"] == 4 for r in rows)
    for li, r in enumerate(rows):
        t_N, p_N = trained.token_ids_N, trained.position_N
        half_N = np.random.default_rng([0, r["block"]]).permutation(64) < 32  # layer_row's first draw (seed 0)
        want_t = script.routing_figures(t_N, p_N, trained.expert_ids_LNK[li][:, 0], half_N)
        want_u = script.routing_figures(t_N, p_N, untrained.expert_ids_LNK[li][:, 0], half_N)
        for k in script.FIGURES:
            assert r[f"trained_{k}"] == pytest.approx(want_t[k], nan_ok=True)  # nan: a share of H = 0
            assert r[f"untrained_{k}"] == pytest.approx(want_u[k], nan_ok=True)
        assert r["tokens"] == 64 and r["hash_mi_plugin_bits"] == pytest.approx(r["hash_expert_entropy_bits"])
    # The two checkpoints differ: four steps at lr 0.05 moved the routers.
    moved = [not torch.equal(a.weight, b.weight) for a, b in zip(
        (m for m in run.model.modules() if isinstance(m, TopKRouter)),
        (m for m in untrained_model(run).modules() if isinstance(m, TopKRouter)), strict=True)]
    assert moved and all(moved)
