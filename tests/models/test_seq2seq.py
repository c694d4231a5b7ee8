"""The T5 / Switch encoder-decoder: relative position buckets, a one-expert MoE equals the dense model, cached
decoding equals the full forward (and reuses the prefix and the cross-attention keys), padding stays out of attention
and of the experts' capacity, the loss, generation, parameter / FLOP counts, and one-line refusals of bad configs.

Shape legend: B batch, S input length, T target length, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit.errors import ConfigError
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.layers.moe import MoE
from moekit.models import (
    Seq2SeqConfig,
    Seq2SeqLM,
    seq2seq_flop_matched_dense,
    seq2seq_flops_per_token,
    seq2seq_parameter_counts,
)
from moekit.models.seq2seq import T5Attention, relative_position_bucket

V, D = 64, 32


def _moe(**kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=24, num_experts=4, top_k=1, capacity_factor=None, activation="geglu_tanh")
    return MoEConfig(**{**base, **kw})


def _config(**kw) -> Seq2SeqConfig:
    base = dict(vocab_size=V, d_model=D, n_heads=4, d_kv=12, d_ff=40, n_encoder_layers=3, n_decoder_layers=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, eos_token_id=1)
    return Seq2SeqConfig(**{**base, **kw})


def _model(config: Seq2SeqConfig, seed: int = 0) -> Seq2SeqLM:
    torch.manual_seed(seed)
    model = Seq2SeqLM(config).eval()
    # Larger router weights than the Switch init, so routing is far from uniform.
    with torch.no_grad():
        for m in model.moe_layers:
            m.router.weight.normal_(0.0, 0.5)
    return model


def _tokens(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(2, V, shape, generator=torch.Generator().manual_seed(seed))


def test_relative_position_buckets_by_hand():
    # Bidirectional, 32 buckets, max distance 128: 16 per direction (keys after the query add 16), 8 exact
    # (distances 0-7), then 8 log buckets 8 + floor(ln(d / 8) / ln(128 / 8) * 8), capped at 15:
    #   d=8 -> 8 + 0 = 8; d=20 -> ln 2.5 / ln 16 = 0.330 -> 8 + 2 = 10; d=50 -> ln 6.25 / ln 16 = 0.661 -> 13;
    #   d=100 -> ln 12.5 / ln 16 = 0.911 -> 15; d=127 -> 0.997 * 8 = 7.98 -> 15; d=1000 -> capped 15;
    #   +20 -> 16 + 10 = 26; +64 -> ln 8 / ln 16 = 0.75 -> 16 + 14 = 30; +1000 -> 31.
    rel = torch.tensor([0, -1, 1, -7, -8, -20, -50, -100, -127, -1000, 20, 64, 1000])
    want = [0, 1, 17, 7, 8, 10, 13, 15, 15, 15, 26, 30, 31]
    assert relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).tolist() == want
    # Causal: later keys (rel > 0) are bucket 0; 16 exact (0-15), then 16 + floor(ln(d / 16) / ln(8) * 16):
    #   d=16 -> 16; d=20 -> ln 1.25 / ln 8 = 0.107 -> 17; d=50 -> ln 3.125 / ln 8 = 0.548 -> 24;
    #   d=100 -> ln 6.25 / ln 8 = 0.881 -> 30; d=127 -> 0.996 * 16 = 15.9 -> 31; d=500 -> capped 31.
    rel = torch.tensor([3, 0, -3, -15, -16, -20, -50, -100, -127, -500])
    want = [0, 0, 3, 15, 16, 17, 24, 30, 31, 31]
    assert relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128).tolist() == want


def test_bias_table_owned_by_first_block_and_shared():
    model = _model(_config())
    for stack in (model.encoder, model.decoder):
        owners = [b.self_attn.relative_bias is not None for b in stack.blocks]
        assert owners == [True] + [False] * (len(owners) - 1)
        assert stack.relative_bias.bidirectional == (stack is model.encoder)
    assert all(b.cross_attn.relative_bias is None for b in model.decoder.blocks)


def test_scores_are_not_scaled():
    attn = T5Attention(D, 2, 8, 0.1)
    x = torch.randn(1, 5, D)
    q = (x @ attn.w_q.T).view(1, 5, 2, 8).transpose(1, 2)
    k, v = attn.keys_values(x)
    probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # no / sqrt(8)
    want = (probs @ v).transpose(1, 2).reshape(1, 5, 16) @ attn.w_out.T
    torch.testing.assert_close(attn(x, None), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_before_moe", [False, True])
def test_one_expert_moe_equals_dense(dense_before_moe):
    """A one-expert top-1 router (softmax over one expert: gate 1), dropless, is its expert: the MoE model with the
    dense model's FFN weights computes the dense model's logits."""
    one = dict(num_experts=1, d_ff=40, normalize_gates=True)
    moe_cfg = _config(encoder_moe=_moe(**one), decoder_moe=_moe(**one), dense_before_moe=dense_before_moe)
    dense_cfg = _config(dense_before_moe=dense_before_moe)
    moe_model, dense = _model(moe_cfg, 1), _model(dense_cfg, 2)
    state = {}
    for name, t in moe_model.state_dict().items():
        if ".router." in name:
            continue
        state[name.replace("ffn.experts.", "ffn.")] = t[0] if ".experts." in name else t
    dense.load_state_dict(state)
    assert len(moe_model.moe_layers) == 2  # encoder block 1, decoder block 1
    x, y = _tokens(0, (2, 11)), _tokens(1, (2, 7))
    with torch.no_grad():
        a, b = moe_model(x, y), dense(x, y)
    torch.testing.assert_close(a.logits_BTV, b.logits_BTV, rtol=1e-5, atol=1e-5)
    assert len(a.aux) == 2 and not b.aux


def _moe_config(**kw) -> Seq2SeqConfig:
    return _config(encoder_moe=_moe(top_k=2), decoder_moe=_moe(), **kw)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 3, 1]])
def test_cached_decoding_equals_full_forward(chunks):
    model = _model(_moe_config(dense_before_moe=True))
    x, y = _tokens(2, (2, 13)), _tokens(3, (2, 9))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    with torch.no_grad():
        full = model(x, decoder_input_ids_BT=y, attention_mask_BS=mask).logits_BTV
        enc, _ = model.encode(x, mask)
        cache = model.new_cache()
        parts, start = [], 0
        for n in chunks:
            parts.append(model.decode(y[:, start:start + n], enc, mask, cache=cache)[0])
            start += n
        assert len(cache) == 9
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_reuses_prefix_and_cross_attention(monkeypatch):
    """Each decoding step projects one new position for self-attention; cross-attention keys and values are
    projected once per block for the whole generation; the encoder runs once."""
    model = _model(_moe_config())
    calls: list[tuple[bool, int]] = []
    original = T5Attention.keys_values

    def spy(self, x):
        calls.append((self.cross, x.shape[1]))
        return original(self, x)

    monkeypatch.setattr(T5Attention, "keys_values", spy)
    model.generate(_tokens(4, (2, 10)), 6, temperature=0)
    n_enc, n_dec = model.config.n_encoder_layers, model.config.n_decoder_layers
    cross = [n for c, n in calls if c]
    assert cross == [10] * n_dec
    self_lengths = [n for c, n in calls if not c]
    assert self_lengths == [10] * n_enc + [1] * (6 * n_dec)


def test_generate_greedy_sampling_and_eos():
    model = _model(_moe_config())
    x = _tokens(5, (3, 8))
    greedy = model.generate(x, 7, temperature=0)
    assert greedy.shape == (3, 8) and (greedy[:, 0] == 0).all()
    # greedy = argmax of the full forward at every step
    with torch.no_grad():
        logits = model(x, decoder_input_ids_BT=greedy[:, :-1]).logits_BTV
    assert torch.equal(logits.argmax(-1), greedy[:, 1:])
    assert torch.equal(model.generate(x, 7, temperature=1.0, top_k=1), greedy)
    a = model.generate(x, 7, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(x, 7, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # a row stops at eos; the rest of it is padding; decoding ends when every row has stopped
    eos = int(greedy[0, 3])
    stopped = model.generate(x, 7, temperature=0, eos_token_id=eos)
    row = stopped[0].tolist()
    assert row[:4] == greedy[0, :4].tolist() and all(t == 0 for t in row[4:])
    assert model.generate(x[0], 7, temperature=0).tolist() == greedy[0].tolist()  # 1-D in, 1-D out


def test_padding_is_masked_out_of_attention_and_capacity():
    x = _tokens(6, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False
    # A capacity-limited encoder router: the 5 padding tokens route nowhere and take no slot.
    capped = _model(_config(encoder_moe=_moe(capacity_factor=1.0, min_capacity=1), decoder_moe=_moe()))
    with torch.no_grad():
        _, aux = capped.encode(x, mask)
    assert int(aux[0].routed_per_expert.sum()) == 7 + 12
    assert int(aux[0].routing.valid_SK.sum()) == 7 + 12
    # Dropless: the real tokens of a padded row compute exactly what the unpadded row computes alone.
    dropless = _model(_moe_config())
    with torch.no_grad():
        enc, _ = dropless.encode(x, mask)
        alone, _ = dropless.encode(x[:1, :7])
    torch.testing.assert_close(enc[:1, :7], alone, rtol=1e-5, atol=1e-5)


def test_loss_is_ce_plus_mean_aux_over_both_stacks():
    model = _model(_moe_config(load_balance_coef=0.1, z_loss_coef=0.01))
    x, y = _tokens(7, (2, 10)), _tokens(8, (2, 6))
    y[1, 4:] = -100
    out = model(x, y)
    shifted = model.shift_right(y)
    assert shifted[:, 0].tolist() == [0, 0] and shifted[1, 5].item() == 0  # start token; -100 -> pad
    assert torch.equal(shifted[:, 1:5], y[:, :4])
    ce = torch.nn.functional.cross_entropy(out.logits_BTV.reshape(-1, V).float(), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ce)
    assert len(out.encoder_aux) == 1 and len(out.decoder_aux) == 1 and out.aux == out.encoder_aux + out.decoder_aux
    lb = torch.stack([a.load_balancing_loss for a in out.aux]).mean()
    z = torch.stack([a.z_loss for a in out.aux]).mean()
    torch.testing.assert_close(out.loss, ce + 0.1 * lb + 0.01 * z)
    assert out.loss.dtype == torch.float32
    # ignored targets take no decoder capacity: 2 * 6 - 2 routed tokens
    assert int(out.decoder_aux[0].routed_per_expert.sum()) == 10
    out.loss.backward()
    assert model.moe_layers[0].router.weight.grad is not None and model.moe_layers[1].router.weight.grad is not None


def test_training_mode_dropout_runs_and_is_off_in_eval():
    model = _model(_config(dropout=0.2, encoder_moe=_moe(router="expert_choice", capacity_factor=2.0)))
    x, y = _tokens(9, (2, 8)), _tokens(10, (2, 5))
    with torch.no_grad():
        a, b = model(x, y).logits_BTV, model(x, y).logits_BTV
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    out = model(x, y)
    out.loss.backward()
    assert not torch.equal(out.logits_BTV.detach(), a)


def test_tied_head_is_scaled_embedding():
    model = _model(_config(tie_embeddings=True))
    assert model.head is None
    x, y = _tokens(11, (1, 6)), _tokens(12, (1, 4))
    with torch.no_grad():
        enc, _ = model.encode(x)
        h, _ = model.decoder(model.embed(y), memory_BSD=enc)
        want = (h * D**-0.5) @ model.embed.weight.T
        torch.testing.assert_close(model(x, decoder_input_ids_BT=y).logits_BTV, want)


PARAM_CONFIGS = {
    "dense_untied": _config(),
    "dense_tied_relu": _config(tie_embeddings=True, activation="relu"),
    "switch": _config(encoder_moe=_moe(activation="gelu_tanh"), decoder_moe=_moe(activation="gelu_tanh"),
                      activation="gelu_tanh"),
    "st_moe": _config(encoder_moe=_moe(top_k=2, d_ff=16), decoder_moe=_moe(top_k=2, d_ff=16), dense_before_moe=True,
                      moe_every=2, moe_offset=0, n_encoder_layers=4, n_decoder_layers=4),
    "ec_encoder": _config(encoder_moe=_moe(router="expert_choice", capacity_factor=2.0), decoder_moe=None,
                          decoder_moe_every=1, decoder_moe_offset=0),
    "noisy_shared": _config(encoder_moe=_moe(noisy_gating=True, top_k=2, num_shared_experts=1, shared_d_ff=8)),
}


@pytest.mark.parametrize("name", sorted(PARAM_CONFIGS))
def test_parameter_counts_equal_numel(name):
    cfg = PARAM_CONFIGS[name]
    model = Seq2SeqLM(cfg)
    counts = seq2seq_parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for m in model.moe_layers for p in m.experts.parameters())
    assert counts["expert"] == expert
    if not model.moe_layers:
        assert counts["active"] == counts["total"]


@pytest.mark.parametrize("name", ["dense_untied", "dense_tied_relu"])
def test_flops_match_a_flop_counter(name):
    """The analytic forward FLOPs of a dense model equal torch's FLOP counter on every matmul. Attention's scores
    and weighted sum are charged 2 * K * H * d_kv per query here (flops.py's convention); the counter charges them
    4 * K * H * d_kv where it sees them, and not at all where SDPA runs a kernel it has no formula for (the CPU
    one), so either total is accepted."""
    cfg = PARAM_CONFIGS[name]
    model = Seq2SeqLM(cfg).eval()
    S, T = 9, 5
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(_tokens(13, (1, S)), decoder_input_ids_BT=_tokens(14, (1, T)))
    inner = cfg.n_heads * cfg.d_kv
    attention = 2 * inner * (cfg.n_encoder_layers * S * S + cfg.n_decoder_layers * (T * T + T * S))
    analytic = seq2seq_flops_per_token(cfg, S, T)["forward_per_example"]
    assert counter.get_total_flops() in (analytic - attention, analytic + attention)


def test_flop_matched_dense():
    for name in ("switch", "st_moe", "ec_encoder", "noisy_shared"):
        cfg = PARAM_CONFIGS[name]
        dense = seq2seq_flop_matched_dense(cfg)
        assert dense.encoder_moe is None and dense.decoder_moe is None
        Seq2SeqLM(dense)  # builds
        moe_flops, dense_flops = seq2seq_flops_per_token(cfg, 16, 8), seq2seq_flops_per_token(dense, 16, 8)
        routers = sum(
            2 * m.num_experts * D * (2 if m.noisy_gating else 1) * len(cfg.moe_layers(stack))
            * (16 if stack == "encoder" else 8)
            for stack in ("encoder", "decoder") if (m := cfg.moe(stack)) is not None
        )
        # shared-expert gates are routing too; none of these configs has one
        assert moe_flops["forward_per_example"] - dense_flops["forward_per_example"] == routers, name
    st = seq2seq_flop_matched_dense(PARAM_CONFIGS["st_moe"])
    model = Seq2SeqLM(st)
    assert [s.ffn.d_ff for s in model.encoder.blocks[0].ff] == [40, 32]  # dense sublayer + the k * d_ff one
    with pytest.raises(ConfigError, match="activation"):
        seq2seq_flop_matched_dense(_config(encoder_moe=_moe(activation="relu")))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(decoder_moe=_moe(router="expert_choice", capacity_factor=1.0)), "decoder_moe"),
        (dict(decoder_moe=_moe(batch_priority=True)), "decoder_moe"),
        (dict(encoder_moe=SoftMoEConfig(d_model=D, d_ff=8, num_experts=2, slots_per_expert=1)), "encoder_moe"),
        (dict(encoder_moe=_moe(d_model=16)), "encoder_moe.d_model"),
        (dict(encoder_moe=_moe(), encoder_dense_d_ff_at_moe=64), "encoder_dense_d_ff_at_moe"),
        (dict(decoder_moe=_moe(), n_decoder_layers=1), "decoder_moe"),
        (dict(moe_offset=2), "moe_offset"),
        (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets"),
        (dict(relative_attention_max_distance=4), "relative_attention_max_distance"),
        (dict(activation="swish"), "activation"),
        (dict(d_kv=None, n_heads=5), "d_model"),
        (dict(eos_token_id=V), "eos_token_id"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configs_refused_in_one_line(kwargs, field):
    with pytest.raises(ConfigError) as info:
        _config(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg and field in msg, msg


def test_encoder_allows_non_causal_routers():
    cfg = _config(encoder_moe=_moe(router="expert_choice", capacity_factor=1.0),
                  decoder_moe=_moe(), dense_before_moe=True)
    model = _model(cfg)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    out = model(_tokens(15, (2, 10)), _tokens(16, (2, 4)), attention_mask_BS=mask)
    assert torch.isfinite(out.loss)
    bp = _model(dataclasses.replace(cfg, encoder_moe=_moe(batch_priority=True, capacity_factor=1.0)))
    assert isinstance(bp.moe_layers[0], MoE) and torch.isfinite(bp(_tokens(15, (2, 10)), _tokens(16, (2, 4))).loss)
