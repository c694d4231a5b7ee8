"""Sigmoid scores, the loss-free balancing bias, group-limited routing, the routed scaling factor and shared experts:
hand-computed routing, the bias never in a gate, the bias update by hand and on a skewed router, configs, counts."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moekit import MoE, MoEConfig
from moekit.data.batches import TokenBatches
from moekit.models import LMConfig, TransformerLM, flop_matched_dense, parameter_counts
from moekit.routing import TopKRouter, update_expert_bias
from moekit.training import TrainConfig, Trainer
from moekit.training.metrics import read_metrics


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _identity_router(**kw) -> TopKRouter:
    r = TopKRouter(4, 4, 2, score_func="sigmoid", **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))  # logits = x
    return r


X = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
# sigmoid scores: s = [0.880797, 0.268941, 0.622459, 0.731059]
S = [_sig(2.0), _sig(-1.0), _sig(0.5), _sig(1.0)]


def test_sigmoid_top2_gates_are_renormalised_scores_times_scaling():
    r = _identity_router(routed_scaling_factor=2.0)
    dec = r(X)
    # top-2 scores: e0 (0.880797), e3 (0.731059); gates = scores / their sum (1.611856) * 2.0
    assert dec.expert_ids_SK.tolist() == [[0, 3]]
    want = [2.0 * S[0] / (S[0] + S[3]), 2.0 * S[3] / (S[0] + S[3])]  # [1.092910, 0.907090]
    torch.testing.assert_close(dec.gates_SK, torch.tensor([want]), rtol=1e-6, atol=1e-6)
    # The balance loss reads the scores normalised over experts: P = s / sum(s) (sum = 2.503256).
    torch.testing.assert_close(dec.probs_SE, torch.tensor([S]) / sum(S), rtol=1e-6, atol=1e-7)


def test_bias_changes_the_choice_never_the_gate():
    r = _identity_router(expert_bias=True)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([-0.5, 0.0, 0.0, 0.0]))
    dec = r(X)
    # biased scores [0.380797, 0.268941, 0.622459, 0.731059]: top-2 = e3, e2 (e0 drops out of the choice) ...
    assert dec.expert_ids_SK.tolist() == [[3, 2]]
    # ... but the gates are the unbiased scores of e3 and e2, renormalised: 0.731059 / 1.353518 = 0.540117, 0.459883
    want = [S[3] / (S[3] + S[2]), S[2] / (S[3] + S[2])]
    torch.testing.assert_close(dec.gates_SK, torch.tensor([want]), rtol=1e-6, atol=1e-6)


def test_group_limited_routing_by_hand():
    # Groups {e0, e1} and {e2, e3}, one eligible group. Biased scores with b = [0, 0, 0.2, 0.2]:
    # [0.880797, 0.268941, 0.822459, 0.931059]; group scores = sum of the two best: 1.149738 and 1.753518, so only
    # group 1 is eligible and the best expert overall (e0, 0.880797 > e2) cannot be chosen.
    r = _identity_router(expert_bias=True, num_expert_groups=2, topk_groups=1, routed_scaling_factor=2.5)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.2, 0.2]))
    dec = r(X)
    assert dec.expert_ids_SK.tolist() == [[3, 2]]
    want = [2.5 * S[3] / (S[3] + S[2]), 2.5 * S[2] / (S[3] + S[2])]  # [1.350293, 1.149707]
    torch.testing.assert_close(dec.gates_SK, torch.tensor([want]), rtol=1e-6, atol=1e-6)
    # Both groups eligible: the plain top-2 (e0 by its unbiased 0.880797 + 0 bias, then e3 at 0.931059 first).
    r2 = _identity_router(expert_bias=True, num_expert_groups=2, topk_groups=2)
    with torch.no_grad():
        r2.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.2, 0.2]))
    assert r2(X).expert_ids_SK.tolist() == [[3, 0]]


def test_gates_never_see_the_bias_property():
    torch.manual_seed(0)
    r = TopKRouter(8, 16, 4, score_func="sigmoid", expert_bias=True, num_expert_groups=4, topk_groups=2)
    with torch.no_grad():
        r.weight.normal_()
        r.expert_bias.normal_(std=0.5)
    x = torch.randn(64, 8)
    dec = r(x)
    scores = torch.sigmoid(x @ r.weight.detach().t())
    chosen = scores.gather(1, dec.expert_ids_SK)
    torch.testing.assert_close(dec.gates_SK, chosen / chosen.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    # and every choice lies in one of the token's two best groups (by the sum of its two best biased scores)
    biased = (scores + r.expert_bias).view(64, 4, 4)
    best = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    assert all(set((dec.expert_ids_SK[t] // 4).tolist()) <= set(best[t].tolist()) for t in range(64))


def test_bias_update_by_hand():
    r = TopKRouter(4, 4, 1, bias_update_rate=0.01)
    with torch.no_grad():
        r.expert_load.copy_(torch.tensor([4.0, 1.0, 1.0, 2.0]))  # mean 2: sign(mean - load) = [-1, +1, +1, 0]
    assert update_expert_bias(r) == 1
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.0]))
    assert r.expert_load.tolist() == [0.0] * 4  # counted afresh for the next step
    # The layer counts its training choices (not its evaluation ones) for the update.
    layer = MoE(MoEConfig(d_model=4, d_ff=8, num_experts=4, top_k=2, capacity_factor=None, bias_update_rate=0.01))
    layer.eval()
    layer(torch.randn(5, 4))
    assert layer.router.expert_load.sum().item() == 0
    layer.train()
    layer(torch.randn(5, 4))
    assert layer.router.expert_load.sum().item() == 10  # 5 tokens x 2 choices


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    E, D = 8, 16
    layer = MoE(MoEConfig(d_model=D, d_ff=8, num_experts=E, top_k=2, capacity_factor=None, score_func="sigmoid",
                          bias_update_rate=0.01))
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[0] += 1.0  # inputs are shifted positive below: expert 0 (and its neighbour) dominate
    x = torch.randn(512, D) + 0.5

    def max_violation() -> float:
        ids = layer.router(x).expert_ids_SK
        load = torch.bincount(ids.reshape(-1), minlength=E).float()
        return float(load.max() / load.mean())

    layer.train()
    before = max_violation()
    for _ in range(300):
        layer.router.expert_load.zero_()
        layer(x)
        update_expert_bias(layer)
    after = max_violation()
    # Measured: 3.79 before and 1.09 after (1 is perfect balance): the bias alone, no loss and no gradient.
    assert before > 2.5 and after < 1.3, (before, after)


def test_shared_experts_and_gate_add_to_the_routed_output():
    torch.manual_seed(0)
    c = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, capacity_factor=None, activation="swiglu",
                  num_shared_experts=2, shared_d_ff=6, shared_expert_gate=True)
    layer = MoE(c)
    assert layer.shared_experts.w_in.shape == (8, 12)  # two shared experts of width 6 as one FFN of width 12
    x = torch.randn(5, 8)
    y, _ = layer(x)
    routed, _ = layer.route(x.view(1, 5, 8))
    w_in, w_gate, w_out = layer.shared_experts.w_in, layer.shared_experts.w_gate, layer.shared_experts.w_out
    shared = (torch.nn.functional.silu(x @ w_gate) * (x @ w_in)) @ w_out
    gate = torch.sigmoid(x @ layer.shared_expert_gate.weight.t())
    torch.testing.assert_close(y, routed + gate * shared, rtol=1e-5, atol=1e-6)


def test_parameter_counts_and_flop_matched_dense_with_shared_experts():
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2, capacity_factor=None, activation="swiglu",
                    num_shared_experts=2, shared_expert_gate=True, score_func="sigmoid", bias_update_rate=1e-3)
    c = LMConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, activation="swiglu",
                 moe=moe)
    model = TransformerLM(c)
    counts = parameter_counts(c)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # the bias is a buffer, not a parameter
    # active per MoE layer: 2 experts (2 * 3 * 16 * 8) + router (8 * 16) + shared (3 * 16 * 16) + gate (16) = 1664
    dense_counts = parameter_counts(dataclasses.replace(c, moe=None))
    moe_layer_active = counts["active"] - (dense_counts["active"] - 3 * 16 * 32)
    assert moe_layer_active == 2 * 3 * 16 * 8 + 8 * 16 + 3 * 16 * 16 + 16
    # the FLOP-matched dense FFN at the MoE block: the k experts' and the shared experts' widths, 2 * 8 + 2 * 8 = 32,
    # which is model.d_ff (so no special width is recorded); with one shared expert it would be 24
    assert flop_matched_dense(c).dense_d_ff_at_moe is None
    one_shared = dataclasses.replace(c, moe=dataclasses.replace(moe, num_shared_experts=1))
    assert flop_matched_dense(one_shared).dense_d_ff_at_moe == 24


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"score_func": "tanh"}, "score_func must be one of"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor must be a finite number > 0"),
        ({"bias_update_rate": -1e-3}, "bias_update_rate"),
        ({"num_expert_groups": 3}, "num_expert_groups must split num_experts=8"),
        ({"num_expert_groups": 8}, "num_expert_groups must split num_experts=8"),
        ({"num_expert_groups": 4, "topk_groups": 5}, "topk_groups must be <= num_expert_groups=4"),
        ({"num_expert_groups": 4, "topk_groups": 1, "top_k": 3}, "top_k=3 exceeds the 2 experts"),
        ({"shared_expert_gate": True}, "shared_expert_gate needs num_shared_experts >= 1"),
        ({"score_func": "sigmoid", "noisy_gating": True}, "noisy_gating is defined for score_func='softmax' only"),
        ({"router": "expert_choice", "score_func": "sigmoid"}, "apply to router='topk' only"),
    ],
)
def test_config_errors(kw, match):
    base = dict(d_model=8, d_ff=8, num_experts=8, top_k=2)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**base)


def test_bias_update_rate_implies_a_bias_and_defaults_keep_todays_router():
    assert MoEConfig(d_model=8, d_ff=8, num_experts=4, bias_update_rate=1e-3).expert_bias is True
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    assert layer.router.expert_bias is None and "router.expert_bias" not in layer.state_dict()


def test_trainer_updates_and_checkpoints_the_bias(tmp_path):
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=None, score_func="sigmoid",
                    bias_update_rate=0.01)
    lm = TransformerLM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe=moe))
    tokens = np.random.default_rng(0).integers(0, 40, 2000).astype(np.int32)
    cfg = TrainConfig(max_steps=6, batch_size=2, log_every=1, eval_every=0, checkpoint_every=3, warmup_steps=0,
                      progress="off")
    Trainer(cfg, lm, TokenBatches(tokens, 2, 8, seed=0), tokens[:200], tmp_path, log=lambda m: None).fit()
    bias = lm.blocks[1].ffn.router.expert_bias
    # Six updates of -0.01, 0 or +0.01 each: every entry is a multiple of 0.01 in [-0.06, 0.06], and at least one
    # expert moved.
    steps = (bias / 0.01).round()
    torch.testing.assert_close(bias, steps * 0.01, rtol=0, atol=1e-6)
    assert steps.abs().max() <= 6 and steps.abs().sum() > 0
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert torch.equal(saved["blocks.1.ffn.router.expert_bias"], bias)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(records[-1]["max_violation_per_layer"]) == 1 and records[-1]["max_violation_per_layer"][0] >= 1.0
    assert records[-1]["expert_bias_range_per_layer"][0] == pytest.approx(float(bias.max() - bias.min()))


def _two_expert_sigmoid_layer(balance_loss: str, group_size: int | None = None) -> MoE:
    layer = MoE(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=1, capacity_factor=None, score_func="sigmoid",
                          balance_loss=balance_loss, group_size=group_size))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))  # logits = x
    return layer


def _normalised(a: float, b: float) -> tuple[float, float]:
    sa, sb = _sig(a), _sig(b)
    return sa / (sa + sb), sb / (sa + sb)


def test_sequence_wise_balance_loss_by_hand():
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [3.0, 0.0]]])  # 2 sequences of 2 tokens
    p = [_normalised(*t) for t in x.reshape(4, 2).tolist()]
    # p = [(0.6379, 0.3621), (0.4062, 0.5938), (0.5939, 0.4061), (0.6558, 0.3442)]; choices e0, e1, e0, e0.
    # Sequence A: f = (1/2, 1/2), P = mean of p over its tokens: L_A = 2 * (0.5 * P0 + 0.5 * P1) = 1 exactly.
    # Sequence B: f = (1, 0), P0 = (0.5939 + 0.6558) / 2 = 0.62485: L_B = 2 * 0.62485 = 1.2497.
    L_A = 2 * (0.5 * (p[0][0] + p[1][0]) / 2 + 0.5 * (p[0][1] + p[1][1]) / 2)
    L_B = 2 * (1.0 * (p[2][0] + p[3][0]) / 2)
    _, aux = _two_expert_sigmoid_layer("sequence")(x)
    assert aux.routing.expert_ids_SK.view(-1).tolist() == [0, 1, 0, 0]
    assert aux.load_balancing_loss.item() == pytest.approx((L_A + L_B) / 2, rel=1e-6)  # 1.12485
    # The Switch loss over the call as one group differs: f = (3/4, 1/4), P = the mean over all four tokens.
    P0 = sum(t[0] for t in p) / 4
    _, aux_switch = _two_expert_sigmoid_layer("switch")(x)
    assert aux_switch.load_balancing_loss.item() == pytest.approx(2 * (0.75 * P0 + 0.25 * (1 - P0)), rel=1e-6)
    # "global" counts over the whole call whatever the routing groups: with two routing groups of 2 tokens it is
    # still the one-group value (in one process; under torch.distributed the counts are summed over the ranks).
    _, aux_global = _two_expert_sigmoid_layer("global", group_size=2)(x)
    assert aux_global.load_balancing_loss.item() == pytest.approx(aux_switch.load_balancing_loss.item(), rel=1e-6)


def test_masked_tokens_change_nothing_in_losses_or_statistics():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, capacity_factor=None, score_func="sigmoid",
                          bias_update_rate=0.01))
    layer.train()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False  # two padding tokens at the end of the first sequence
    mask[1, 5] = False
    y, aux = layer(x, mask)
    load_masked = layer.router.expert_load.clone()
    layer.router.expert_load.zero_()
    real = x[mask]  # the 9 real tokens as one call
    y_real, aux_real = layer(real)
    for name in ("load_balancing_loss", "z_loss", "router_entropy", "max_logit"):
        torch.testing.assert_close(getattr(aux, name), getattr(aux_real, name), rtol=1e-6, atol=1e-7)
    assert aux.tokens_per_expert.tolist() == aux_real.tokens_per_expert.tolist()
    assert aux.drop_fraction.item() == 0.0
    assert torch.equal(load_masked, layer.router.expert_load)  # padding never moves the balancing bias
    torch.testing.assert_close(y[mask], y_real, rtol=1e-5, atol=1e-6)
    assert torch.equal(y[~mask], torch.zeros(3, 8))  # padding gets no routed output
    # Whatever the padding holds, nothing changes.
    x2 = x.clone()
    x2[~mask] = 100.0
    y2, aux2 = layer(x2, mask)
    torch.testing.assert_close(y2[mask], y[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux2.load_balancing_loss, aux.load_balancing_loss)
    torch.testing.assert_close(aux2.z_loss, aux.z_loss)


def test_masked_tokens_take_no_capacity_slot():
    layer = MoE(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=1, capacity_factor=1.0, min_capacity=0))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # every token prefers expert 0
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])  # C = ceil(1.0 * 1 * 4 / 2) = 2
    _, aux = layer(x)
    assert aux.plan.kept_mask_SK().view(-1).tolist() == [True, True, False, False]  # group order: t0, t1 win
    _, aux = layer(x, torch.tensor([False, True, True, True]))
    # t0 is padding: it takes no slot, so t1 and t2 get expert 0's two slots; of 3 real choices 1 is dropped
    assert aux.plan.kept_mask_SK().view(-1).tolist() == [False, True, True, False]
    assert aux.drop_fraction.item() == pytest.approx(1 / 3)
    # The router asked expert 0 for 3 tokens (its load before capacity); 2 were kept.
    assert aux.routed_per_expert.tolist() == [3, 0] and aux.tokens_per_expert.tolist() == [2, 0]


def test_mask_is_refused_for_expert_choice():
    layer = MoE(MoEConfig(d_model=4, d_ff=8, num_experts=2, router="expert_choice", capacity_factor=1.0))
    with pytest.raises(ValueError, match="token mask and routing replay are supported for router=.topk. only"):
        layer(torch.randn(3, 4), torch.ones(3, dtype=torch.bool))


def test_router_replay_routes_alike_and_trains_the_router():
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, capacity_factor=None, score_func="sigmoid",
                    expert_bias=True, num_expert_groups=4, topk_groups=2)
    model = TransformerLM(LMConfig(vocab_size=40, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=8,
                                   moe=moe, moe_every=2, moe_offset=1))
    tokens = torch.randint(0, 40, (2, 8))
    first = model(tokens, tokens)
    recorded = [a.routing.expert_ids_SK for a in first.aux]
    # Equal decisions -> equal outputs.
    again = model(tokens, tokens, replay=recorded)
    assert all(torch.equal(a.routing.expert_ids_SK, r) for a, r in zip(again.aux, recorded, strict=True))
    torch.testing.assert_close(again.logits_BTV, first.logits_BTV, rtol=0, atol=0)
    # Change the router (as an RL update would): a free pass now routes differently, the replay keeps the recorded
    # experts, and the replayed pass's gradients reach the router through the recomputed gates.
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.add_(torch.randn_like(layer.router.weight))
    free = model(tokens, tokens)
    assert any(not torch.equal(a.routing.expert_ids_SK, r) for a, r in zip(free.aux, recorded, strict=True))
    forced = model(tokens, tokens, replay=recorded)
    assert all(torch.equal(a.routing.expert_ids_SK, r) for a, r in zip(forced.aux, recorded, strict=True))
    forced.ce_loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.moe_layers)
    with pytest.raises(ValueError, match="one routing per MoE layer"):
        model(tokens, replay=recorded[:1])
