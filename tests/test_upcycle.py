"""Sparse upcycling (moekit.upcycle): at initialisation the upcycled MoE model computes the dense model's logits, for
plain and fine-grained (granularity > 1) upcycling, with plain and gated activations; the router's ties pick whole
copies; training moves the copies apart; bad arguments are one-line ConfigErrors."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import ConfigError
from moekit.layers.moe import MoE
from moekit.models import TransformerLM
from moekit.models.config import LMConfig
from moekit.upcycle import upcycle, upcycle_config

V, D, F, T = 61, 32, 64, 12


def _trained_dense(activation: str, seed: int = 0, **kw) -> TransformerLM:
    """A small dense LM whose weights are not at their init (a few random steps), so that every FFN carries a
    distinct, non-trivial function."""
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=V, d_model=D, n_layers=4, n_heads=2, d_ff=F, max_seq_len=T, activation=activation,
                   **kw)
    model = TransformerLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        tokens = torch.randint(0, V, (4, T))
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("experts,top_k,granularity", [(4, 1, 1), (8, 2, 1), (8, 2, 2), (16, 4, 4), (8, 4, 2)])
def test_upcycled_logits_equal_dense_at_init(activation, experts, top_k, granularity):
    dense = _trained_dense(activation)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, num_experts=experts, top_k=top_k, granularity=granularity,
                  generator=torch.Generator().manual_seed(3)).eval()
    tokens = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = dense(tokens).logits_BTV
        out = moe(tokens)
    assert ref.abs().max() > 0.1  # a real function, not a near-zero one
    torch.testing.assert_close(out.logits_BTV, ref, rtol=0, atol=2e-5)
    assert len(out.aux) == 2 and all(a.metrics()["drop_fraction"] == 0.0 for a in out.aux)  # dropless
    # The source is untouched, and the upcycled model is its own (no shared storage).
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert moe.embed.weight.data_ptr() != dense.embed.weight.data_ptr()
    assert moe.config.moe.d_ff == F // granularity and moe.config.moe.activation == activation


def test_expert_weights_are_chunks_of_the_dense_ffn():
    dense = _trained_dense("swiglu")
    moe = upcycle(dense, num_experts=8, top_k=4, granularity=4)
    src, bank = dense.blocks[1].ffn, moe.blocks[1].ffn.experts
    f = F // 4
    for e in range(8):
        j = e % 4  # expert c * g + j is chunk j of copy c
        assert torch.equal(bank.w_in[e], src.w_in[:, j * f:(j + 1) * f])
        assert torch.equal(bank.w_gate[e], src.w_gate[:, j * f:(j + 1) * f])
        assert torch.equal(bank.w_out[e], 4 * src.w_out[j * f:(j + 1) * f])
    # Attention, norms, embeddings and the dense FFNs that stay dense are copied exactly.
    for name in ("blocks.0.ffn.w_in", "blocks.2.ffn.w_out", "blocks.1.attn.w_qkv", "blocks.3.ffn_norm.weight",
                 "embed.weight", "final_norm.weight"):
        assert torch.equal(moe.state_dict()[name], dense.state_dict()[name]), name


def test_router_ties_pick_whole_copies():
    dense = _trained_dense("gelu")
    g, E, k = 4, 16, 8
    moe = upcycle(dense, num_experts=E, top_k=k, granularity=g, generator=torch.Generator().manual_seed(0)).eval()
    layer: MoE = moe.blocks[1].ffn
    w = layer.router.weight
    assert torch.equal(w, w.view(E // g, g, D)[:, :1].expand(-1, g, -1).reshape(E, D))  # one row per copy
    assert float(w.detach().std()) == pytest.approx(0.02, rel=0.3)
    x = torch.randn(500, D)
    decision = layer.router(x)
    ids, gates = decision.expert_ids_SK, decision.gates_SK
    copies = ids // g
    for s in range(0, 500, 7):
        chosen = sorted(ids[s].tolist())
        # k / g whole copies: every chunk 0..g-1 of each chosen copy.
        assert chosen == sorted(c * g + j for c in set(copies[s].tolist()) for j in range(g))
        assert len(set(copies[s].tolist())) == k // g
        # each chunk j gets total gate weight 1 / g over the copies
        per_chunk = torch.zeros(g).index_add_(0, ids[s] % g, gates[s])
        torch.testing.assert_close(per_chunk, torch.full((g,), 1 / g), rtol=0, atol=1e-6)


def test_config_keeps_every_other_field():
    cfg = LMConfig(vocab_size=V, d_model=D, n_layers=4, n_heads=2, d_ff=F, max_seq_len=T, rope_base=500.0,
                   norm_eps=1e-5, tie_embeddings=False, z_loss_coef=0.0)
    up = upcycle_config(cfg, num_experts=8, top_k=2, moe_every=2, capacity_factor=1.5)
    assert (up.rope_base, up.norm_eps, up.tie_embeddings, up.z_loss_coef) == (500.0, 1e-5, False, 0.0)
    assert up.moe.num_experts == 8 and up.moe.top_k == 2 and up.moe.capacity_factor == 1.5
    assert up.moe.normalize_gates is True and up.moe_layers() == [1, 3]
    # A FLOP-matched dense (wider FFNs at the MoE positions) upcycles into experts of that width.
    wide = LMConfig(vocab_size=V, d_model=D, n_layers=4, n_heads=2, d_ff=F, max_seq_len=T, dense_d_ff_at_moe=2 * F)
    assert upcycle_config(wide, num_experts=4, top_k=2, granularity=2).moe.d_ff == F
    assert upcycle_config(wide, num_experts=4, top_k=2, granularity=2).dense_d_ff_at_moe is None


def test_untied_head_and_wide_ffn_identity():
    dense = _trained_dense("geglu", tie_embeddings=False, dense_d_ff_at_moe=2 * F)
    moe = upcycle(dense, num_experts=6, top_k=2, granularity=2, moe_every=2).eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits_BTV, dense(tokens).logits_BTV, rtol=0, atol=2e-5)


def test_attention_fields_and_dense_layers_carry_over():
    dense = _trained_dense("swiglu", n_kv_heads=1, qk_norm="head", dense_layers=[1])
    moe = upcycle(dense, num_experts=4, top_k=2, moe_every=1, moe_offset=0).eval()
    assert moe.config.moe_layers() == [0, 2, 3] and moe.config.dense_layers == [1]
    assert (moe.config.n_kv_heads, moe.config.qk_norm) == (1, "head")
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits_BTV, dense(tokens).logits_BTV, rtol=0, atol=2e-5)


def test_training_moves_the_copies_apart():
    dense = _trained_dense("gelu")
    moe = upcycle(dense, num_experts=4, top_k=2, generator=torch.Generator().manual_seed(0)).train()
    bank = moe.blocks[1].ffn.experts
    assert all(torch.equal(bank.w_in[0], bank.w_in[e]) for e in range(4))
    router_before = moe.blocks[1].ffn.router.weight.detach().clone()
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    torch.manual_seed(1)
    losses = []
    for _ in range(5):
        tokens = torch.randint(0, V, (8, T))
        out = moe(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    spread = max(float((bank.w_in[e] - bank.w_in[0]).detach().abs().max()) for e in range(1, 4))
    assert spread > 1e-4  # the experts got different tokens, hence different gradients
    assert all(torch.isfinite(torch.tensor(losses)))
    # The router learned too.
    assert float((moe.blocks[1].ffn.router.weight.detach() - router_before).abs().max()) > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    ({"num_experts": 6, "top_k": 2, "granularity": 4}, "multiple of granularity"),
    ({"num_experts": 8, "top_k": 2, "granularity": 4}, "top_k .* multiple of granularity"),
    ({"num_experts": 8, "top_k": 1, "granularity": 2}, "whole copies"),
    ({"num_experts": 6, "top_k": 3, "granularity": 3}, "divisible by granularity"),
    ({"num_experts": 4, "top_k": 2, "normalize_gates": False}, "normalize_gates must be true"),
    ({"num_experts": 0, "top_k": 1}, "num_experts must be a positive integer"),
    ({"num_experts": 4, "top_k": 5}, "top_k must be <= num_experts"),
    ({"num_experts": 4, "top_k": 1, "moe_offset": 2}, "moe_offset"),
    ({"num_experts": 4, "top_k": 1, "router_init_scale": 0.0}, "router_init_scale"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    cfg = LMConfig(vocab_size=V, d_model=D, n_layers=4, n_heads=2, d_ff=F, max_seq_len=T)
    with pytest.raises(ConfigError, match=match) as info:
        upcycle_config(cfg, **kwargs)
    assert "\n" not in str(info.value)


def test_refuses_an_moe_source():
    dense = _trained_dense("gelu")
    moe = upcycle(dense, num_experts=4, top_k=1)
    with pytest.raises(ConfigError, match="already MoE"):
        upcycle(moe, num_experts=4, top_k=1)
