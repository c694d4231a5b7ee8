"""benchmarks/repro/router_precision.py: the paired difference, the Fisher test and the top-1 flip share (on a tiny
trained run) that the study reports."""

import statistics

import numpy as np
import pytest
import torch

SCRIPT = "router_precision"  # benchmarks/repro/router_precision.py, loaded by the script fixture (conftest.py)


def test_analysis_pairs_by_seed(script):
    # bf16 worse by 0.02 + s / 100 at seed s (0.02, 0.03, 0.04: mean 0.03, sd 0.01), a seed effect of 0.5 per seed;
    # bf16 seed 2 unstable.
    rows = []
    for s in range(3):
        rows.append({"arm": "fp32", "seed": s, "final_val_loss": 4 + s / 2, "max_router_logit": 2.0, "spikes": 0,
                     "flip_share_per_layer": [0.0, 0.02]})
        rows.append({"arm": "bf16", "seed": s, "final_val_loss": 4 + s / 2 + 0.02 + s / 100,
                     "max_router_logit": 3.0, "spikes": 4 if s == 2 else 0, "flip_share_per_layer": [0.01, 0.03]})
    stats = script.analyse({"rows": rows, "lr": 0.01})
    assert stats["diff"]["mean"] == pytest.approx(0.03)
    assert stats["diff"]["half"] == pytest.approx(4.303 * 0.01 / 3**0.5)  # 0.0248 < 0.03: on the paper's side
    assert stats["diff"]["verdict"] == "reproduced"
    assert stats["seed_sd"]["fp32"] == pytest.approx(0.5)
    assert stats["unstable"] == {"fp32": 0, "bf16": 1}
    # Fisher, 1/3 vs 0/3: the tables with one unstable run in total are 1-0 and 0-1, each with probability 1/2.
    assert stats["fisher"]["p"] == pytest.approx(1.0) and stats["fisher"]["verdict"] == "not resolved at this scale"
    assert stats["flip"]["bf16"][0] == pytest.approx(0.02)


def test_flip_share_on_a_trained_run(script, tmp_path):
    import moekit.lab
    from moekit.routing.topk import TopKRouter

    words = "the cat sat on a mat and the dog ran to the red rug then it was very happy".split()
    rng = np.random.default_rng(0)
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(400)))
    run_dir = tmp_path / "run"
    moekit.lab.train("switch-tiny", run_dir, {
        "data.corpus": str(tmp_path / "c.txt"), "data.vocab_size": 300, "data.seq_len": 16,
        "data.piece_chars": 256, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64,
        "train.max_steps": 4, "train.batch_size": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
        "train.warmup_steps": 1, "train.progress": "off", "train.threads": 1})
    shares = script.flip_shares(str(run_dir), 64)

    # Independently: the model's own (float32) routing of the same 4 x 16 tokens, and the layer inputs it saw.
    run = moekit.lab.load_run(run_dir)
    routers = [m for m in run.model.modules() if isinstance(m, TopKRouter)]
    seen = []
    hooks = [r.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))) for r in routers]
    ids_BT = torch.as_tensor(run.data.val_tokens[:64].astype("int64")).reshape(4, 16)
    with torch.no_grad():
        run.model(ids_BT)
    for h in hooks:
        h.remove()
    assert len(shares) == len(routers) == len(seen)
    for share, router, x_SD in zip(shares, routers, seen, strict=True):
        w_ED = router.weight.detach()
        top_fp32 = (x_SD @ w_ED.T).argmax(-1)
        top_bf16 = torch.softmax((x_SD.bfloat16() @ w_ED.bfloat16().T).float(), -1).argmax(-1)
        expected = float((top_fp32 != top_bf16).double().mean())
        # Ties in bf16 may break either way between argmax and topk; everything else must agree.
        assert share == pytest.approx(expected, abs=2 / x_SD.shape[0])
    assert statistics.fmean(shares) <= 0.5


def test_instability_is_read_on_the_trailing_mean(script):
    import argparse
    import math

    args = argparse.Namespace(smooth=4, spike=0.5)
    # A falling curve with one batch 0.8 nats high at step 6: step by step a spike, averaged over 4 steps it is
    # 0.2 nats, under the threshold.
    noisy = [5.0, 4.9, 4.8, 4.7, 4.6, 4.5, 5.3, 4.4, 4.3, 4.2]
    assert script.spikes(noisy, 0.5) == 1 and script.unstable_steps(noisy, args) == 0
    # Trailing means of 4: (5.0), (4.95), (4.9), (4.85), then 4.75, 4.65, 4.775 (5.3 in it), 4.7, 4.65, 4.55.
    assert script.trailing_mean(noisy, 4)[:4] == pytest.approx([5.0, 4.95, 4.9, 4.85])
    assert script.trailing_mean(noisy, 4)[6] == pytest.approx((4.7 + 4.6 + 4.5 + 5.3) / 4)
    # A divergence: from step 4 on the loss stays 1 nat up. Trailing means: 5.0, 4.95, 4.9, 4.85, then 5.025,
    # 5.225, 5.45, 5.7, 5.7; the running minimum stays 4.85, so the last three are more than 0.5 above it.
    diverging = [5.0, 4.9, 4.8, 4.7, 5.7, 5.7, 5.7, 5.7, 5.7]
    assert script.trailing_mean(diverging, 4) == pytest.approx([5.0, 4.95, 4.9, 4.85, 5.025, 5.225, 5.45, 5.7, 5.7])
    assert script.unstable_steps(diverging, args) == 3
    # A non-finite loss makes every window that holds it unstable.
    assert script.unstable_steps([5.0, 4.9, math.nan, 4.8, 4.7, 4.6, 4.5], args) == 4
