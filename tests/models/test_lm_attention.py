"""The decoder's attention options and the KV cache.

- grouped-query attention equals multi-head attention with each key/value head repeated for its query heads;
- QK norm ("projection" / "head") and biases are applied where the config says (checked against a reference
  attention written out in full here);
- decoding with a KV cache gives the logits of a full forward pass, token by token and in chunks;
- parameter counts match the built model for every option;
- bad values are refused in one line.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.errors import ConfigError
from moekit.layers.config import MoEConfig
from moekit.models import LMConfig, TransformerLM, parameter_counts
from moekit.models.blocks import RMSNorm, SelfAttention


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    T, Hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, Hd, 2).float() / Hd)
    ang = torch.arange(T).float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def _reference_attention(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out head by head: softmax(q k^T / sqrt(Hd) + causal mask) v, query head h reading key/value
    head h // (H / Hkv)."""
    B, T, _ = x.shape
    H, Hkv, Hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = x @ attn.w_qkv.T + (attn.b_qkv if attn.b_qkv is not None else 0)
    q, k, v = qkv.split([H * Hd, Hkv * Hd, Hkv * Hd], -1)
    if attn.qk_norm == "projection":
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    q = q.view(B, T, H, Hd).transpose(1, 2)
    k = k.view(B, T, Hkv, Hd).transpose(1, 2)
    v = v.view(B, T, Hkv, Hd).transpose(1, 2)
    if attn.qk_norm == "head":
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    q, k = _rope(q), _rope(k)
    out = torch.empty(B, H, T, Hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(H):
        g = h // (H // Hkv)
        s = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(Hd)
        out[:, h] = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, g]
    o = out.transpose(1, 2).reshape(B, T, H * Hd) @ attn.w_out.T
    return o + (attn.b_out if attn.b_out is not None else 0)


@pytest.mark.parametrize("kv, head_dim, qk_norm, bias", [
    (4, None, "none", False), (2, None, "none", True), (1, 12, "head", False), (2, 10, "projection", True),
])
def test_attention_options_equal_reference(kv, head_dim, qk_norm, bias):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=kv, head_dim=head_dim,
                   qk_norm=qk_norm, qkv_bias=bias, out_bias=bias, max_seq_len=16)
    model = TransformerLM(cfg)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # biases and norm weights away from 0 / 1
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    # parameter shapes: q, k, v stacked; [D, H * Hd] output
    Hd = head_dim or 8
    assert attn.w_qkv.shape == ((4 + 2 * kv) * Hd, 32) and attn.w_out.shape == (32, 4 * Hd)
    if qk_norm == "head":
        assert isinstance(attn.q_norm, RMSNorm) and attn.q_norm.weight.shape == (Hd,)


def _model(**kw) -> TransformerLM:
    torch.manual_seed(1)
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, capacity_factor=None, activation="swiglu")
    cfg = LMConfig(vocab_size=60, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=32,
                   activation="swiglu", moe=moe, **kw)
    return TransformerLM(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"qk_norm": "head", "qkv_bias": True}, {"qk_norm": "projection"}])
def test_kv_cache_decoding_equals_full_forward(kw):
    model = _model(**kw)
    tokens = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens).logits_BTV
        cache = model.new_cache()
        parts = [model(tokens[:, :7], cache=cache).logits_BTV]  # a prompt, then chunks and single tokens
        parts.append(model(tokens[:, 7:12], cache=cache).logits_BTV)
        for t in range(12, 20):
            parts.append(model(tokens[:, t : t + 1], cache=cache).logits_BTV)
    assert len(cache) == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_with_cache_equals_recomputing_the_prefix():
    model = _model()
    prompt = torch.tensor([5, 9, 2, 7])
    got = model.generate(prompt, 40, temperature=0)  # runs past max_seq_len = 32: the window slides
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(40):
            nxt = model(seq[-32:].unsqueeze(0)).logits_BTV[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1)])
    assert got.tolist() == seq.tolist()
    batch = model.generate(torch.stack([prompt, prompt.flip(0)]), 6, temperature=0)
    assert batch.shape == (2, 10) and batch[0].tolist() == got[:10].tolist()


@pytest.mark.parametrize("kw", [
    {}, {"n_kv_heads": 1}, {"head_dim": 6, "qk_norm": "head"}, {"qk_norm": "projection", "n_kv_heads": 2},
    {"qkv_bias": True}, {"qkv_bias": True, "out_bias": True, "tie_embeddings": False},
])
def test_parameter_counts_match_the_model(kw):
    moe = MoEConfig(d_model=24, d_ff=8, num_experts=3, top_k=1, activation="swiglu")
    cfg = LMConfig(vocab_size=40, d_model=24, n_layers=4, n_heads=4, d_ff=20, activation="swiglu", moe=moe,
                   dense_layers=[3], moe_every=1, moe_offset=0, **kw)
    model = TransformerLM(cfg)
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())
    assert cfg.moe_layers() == [0, 1, 2]


@pytest.mark.parametrize("kw, message", [
    ({"n_kv_heads": 3}, "multiple of model.n_kv_heads"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"qk_norm": "layer"}, "model.qk_norm must be one of"),
    ({"dense_layers": [9]}, "dense_layers must be a list of block indices"),
    ({"qkv_bias": 1}, "qkv_bias must be true or false"),
])
def test_bad_attention_options_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        LMConfig(vocab_size=40, d_model=24, n_layers=4, n_heads=4, **kw)


def test_gqa_equals_mha_with_repeated_key_value_heads():
    # enable_gqa in SDPA equals repeating each key/value head (the reference above); here the other way round:
    # a GQA layer equals an MHA layer whose key/value weights are the repeated ones.
    torch.manual_seed(0)
    gqa = SelfAttention(32, 4, 0.1, causal=True, n_kv_heads=2)
    mha = SelfAttention(32, 4, 0.1, causal=True)
    q, k, v = gqa.w_qkv.split([32, 16, 16])
    rep = lambda w: w.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)  # noqa: E731
    with torch.no_grad():
        mha.w_qkv.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.w_out.copy_(gqa.w_out)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)
