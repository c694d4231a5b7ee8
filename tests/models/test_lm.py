"""TransformerLM: parameter and FLOP counts, the loss formula, causality, refusals, and 1 expert == dense."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, SoftMoEConfig
from moekit.models import LMConfig, TransformerLM, flop_matched_dense, flops_per_token, parameter_counts


def _moe(**kw) -> MoEConfig:
    base = dict(d_model=16, d_ff=32, num_experts=4, top_k=1, capacity_factor=1.25)
    base.update(kw)
    return MoEConfig(**base)


def _cfg(**kw) -> LMConfig:
    base = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe=_moe())
    base.update(kw)
    return LMConfig(**base)


def test_parameter_counts_golden_and_match_numel():
    c = _cfg()
    # embedding 50*16 = 800 (tied); final norm 16; per block: attention 4*16*16 = 1024 + two norms 32 = 1056.
    # block 0 dense FFN: 2*16*32 = 1024. block 1 MoE: 4 experts * 1024 + router 4*16 = 4160; active 1024 + 64.
    # total = 800 + 16 + 2*1056 + 1024 + 4160 = 8112; active = 8112 - 3*1024 = 5040.
    counts = parameter_counts(c)
    assert counts == {"total": 8112, "active": 5040, "embedding": 800, "expert": 4096}
    assert sum(p.numel() for p in TransformerLM(c).parameters()) == 8112
    for variant in (
        _cfg(tie_embeddings=False),
        _cfg(activation="swiglu", moe=_moe(activation="swiglu", top_k=2)),
        _cfg(moe=None),
        flop_matched_dense(_cfg(moe=_moe(top_k=2))),
    ):
        assert (
            sum(p.numel() for p in TransformerLM(variant).parameters()) == parameter_counts(variant)["total"]
        )


def test_flops_golden():
    c = _cfg()
    # matmul params = active 5040 - embedding 800 + head 800 - norms (2*2+1)*16 = 4960;
    # forward = 2 * 4960 + attention 2 * 2 layers * 8 tokens * 16 = 9920 + 512 = 10432; train = 3x.
    assert flops_per_token(c) == {"forward": 10432, "train": 31296}


def test_flop_matched_dense_has_the_same_active_flops_up_to_the_router():
    for k in (1, 2):
        c = _cfg(moe=_moe(top_k=k))
        d = flop_matched_dense(c)
        assert d.moe is None
        assert d.dense_d_ff_at_moe == (None if k == 1 else 64)
        router = 4 * 16
        assert parameter_counts(c)["active"] - router == parameter_counts(d)["active"]
        assert flops_per_token(c)["forward"] - 2 * router == flops_per_token(d)["forward"]


def test_loss_is_ce_plus_weighted_mean_aux_losses():
    torch.manual_seed(0)
    c = _cfg(n_layers=4, moe_every=2, moe_offset=1, load_balance_coef=0.5, z_loss_coef=0.25)
    model = TransformerLM(c)
    tokens = torch.randint(0, 50, (3, 8))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert len(out.aux) == 2
    lb = (out.aux[0].load_balancing_loss + out.aux[1].load_balancing_loss) / 2
    z = (out.aux[0].z_loss + out.aux[1].z_loss) / 2
    ce = torch.nn.functional.cross_entropy(out.logits_BTV.reshape(-1, 50), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.5 * lb + 0.25 * z)
    # a dense model has no aux: the loss is the cross-entropy
    dense = TransformerLM(_cfg(moe=None))
    o = dense(tokens[:, :-1], tokens[:, 1:])
    assert o.aux == [] and float(o.loss.detach()) == float(o.ce_loss.detach())


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = TransformerLM(_cfg(moe=_moe(capacity_factor=1.0))).eval()  # capacity drops included
    a = torch.randint(0, 50, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 7) % 50
    la, lb = model(a).logits_BTV, model(b).logits_BTV
    # equal up to float rounding (a different set of rows goes through each kernel call)
    torch.testing.assert_close(la[0, :5], lb[0, :5], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(la[0, 5:], lb[0, 5:])


@pytest.mark.parametrize(
    "moe, words",
    [
        (_moe(router="expert_choice", capacity_factor=1.0), "expert choice"),
        (_moe(batch_priority=True), "batch-priority"),
        (SoftMoEConfig(d_model=16, d_ff=32, num_experts=4), "Soft MoE"),
    ],
)
def test_non_causal_routing_is_refused(moe, words):
    with pytest.raises(ValueError, match=words):
        _cfg(moe=moe)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="n_heads"):
        _cfg(n_heads=3)
    with pytest.raises(ValueError, match="moe_offset"):
        _cfg(moe_every=2, moe_offset=2)
    with pytest.raises(ValueError, match="no block is MoE"):
        _cfg(n_layers=2, moe_every=4, moe_offset=3)
    with pytest.raises(ValueError, match="moe.d_model"):
        _cfg(moe=_moe(d_model=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        TransformerLM(_cfg())(torch.zeros(1, 9, dtype=torch.long))


def test_one_expert_without_capacity_equals_the_dense_model():
    torch.manual_seed(0)
    moe_model = TransformerLM(_cfg(moe=_moe(num_experts=1, capacity_factor=None))).eval()
    dense_model = TransformerLM(_cfg(moe=None)).eval()
    sd = moe_model.state_dict()
    dense_sd = {}
    for k, v in sd.items():
        if "router" in k:
            continue
        dense_sd[k.replace("ffn.experts.", "ffn.")] = v[0] if ".experts." in k else v
    dense_model.load_state_dict(dense_sd)
    tokens = torch.randint(0, 50, (2, 8))
    # one expert: softmax over one logit is exactly 1.0, the gate (Switch k=1 does not renormalise)
    torch.testing.assert_close(
        moe_model(tokens).logits_BTV, dense_model(tokens).logits_BTV, rtol=1e-6, atol=1e-6
    )


def test_generate_greedy_is_deterministic_and_extends_the_prompt():
    torch.manual_seed(0)
    model = TransformerLM(_cfg()).eval()
    prompt = torch.tensor([1, 2, 3])
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (13,) and torch.equal(a[:3], prompt) and torch.equal(a, b)
