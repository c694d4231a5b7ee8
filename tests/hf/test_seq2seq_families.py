"""T5 and Switch Transformers checkpoints in and out are exact: logits (and the loss) equal transformers' on the same
weights with padded inputs, a moekit model exported loads in transformers with equal logits, import -> export ->
import is bit-identical, greedy decoding picks transformers' tokens, and relative position buckets equal
transformers'. Tiny random models, built from configs (nothing downloads).

Shape legend: B batch, S input length, T target length.
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.errors import MoekitError
from moekit.hf import from_pretrained, read_hf_config, save_pretrained
from moekit.layers.config import MoEConfig
from moekit.models import Seq2SeqConfig, Seq2SeqLM
from moekit.models.seq2seq import relative_position_bucket

transformers = pytest.importorskip("transformers")

RTOL = 1e-4
V = 96
COMMON = dict(vocab_size=V, d_model=32, d_kv=12, d_ff=40, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
KINDS = {
    # T5 v1.1: gated GELU (tanh), untied head; 3 encoder and 2 decoder blocks.
    "t5_v1_1": ("t5", dict(feed_forward_proj="gated-gelu", num_layers=3, num_decoder_layers=2,
                           tie_word_embeddings=False)),
    # T5 v1.0: ReLU, head tied to the embeddings and the decoder output scaled by d_model ** -0.5.
    # (transformers 5's generate sizes its decoder cache by num_layers: more decoder than encoder layers breaks it)
    "t5_v1_0": ("t5", dict(feed_forward_proj="relu", num_layers=2, num_decoder_layers=2)),
    # Switch: encoder blocks 1 and 3 sparse (4 // 2 = step 2), decoder block 1 (3 // 1 = step 3); untied head.
    "switch": ("switch_transformers", dict(dense_act_fn="gelu_new", num_layers=4, num_decoder_layers=3, num_experts=4,
                                           num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
                                           expert_capacity=10_000, tie_word_embeddings=False)),
    # Switch, tied: every encoder block sparse (step 1); num_sparse_decoder_layers = 0 still makes decoder block 1
    # sparse (step = 2 // 1... transformers' "HACK": step num_layers = 2, and 1 % 2 == 1).
    "switch_tied": ("switch_transformers", dict(dense_act_fn="relu", num_layers=2, num_decoder_layers=2,
                                                num_experts=3, num_sparse_encoder_layers=2,
                                                num_sparse_decoder_layers=0, expert_capacity=10_000)),
}


def tiny_seq2seq(kind: str, seed: int = 0):
    """A float32, eval-mode transformers encoder-decoder with weights ~ N(0, 0.15^2) (norms around 1, embeddings
    N(0, 1), routers and bias tables ~ N(0, 0.5^2), so routing is far from uniform and logits are O(1))."""
    model_type, kwargs = KINDS[kind]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).float().eval()
    untied = kwargs.get("tie_word_embeddings") is False
    if model_type == "t5" and untied:  # transformers 5 ties T5's head by default; v1.1 checkpoints carry their own
        model.lm_head.weight = torch.nn.Parameter(torch.empty(V, 32))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name == "shared.weight":  # T5's N(0, 1) embeddings: a tied head scales them by d_model ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name or "router" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        if model_type == "switch_transformers" and untied:
            # untied, transformers 5 keeps three input embeddings; moekit has one (checkpoints hold it three times)
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [2, 15] (the second row padded after 10 tokens) and labels [2, 9] (the second row's last 3 ignored)."""
    g = torch.Generator().manual_seed(seed)
    x_BS, y_BT = torch.randint(2, V, (2, 15), generator=g), torch.randint(2, V, (2, 9), generator=g)
    mask_BS = torch.ones(2, 15, dtype=torch.long)
    mask_BS[1, 10:] = 0
    x_BS[1, 10:] = 0
    y_BT[1, 6:] = -100
    return x_BS, mask_BS, y_BT


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _real(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    return logits_BTV[y_BT != -100]


@pytest.fixture(scope="module", params=sorted(KINDS))
def saved(request, tmp_path_factory):
    kind = request.param
    hf = tiny_seq2seq(kind)
    path = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(path)
    return kind, hf, path


def test_import_logits_and_loss_equal_transformers(saved):
    kind, hf, path = saved
    mk = from_pretrained(path)
    assert isinstance(mk, Seq2SeqLM)
    x, mask, y = _batch()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=y)
        got = mk(x, y, attention_mask_BS=mask)
    assert ref.logits.abs().max() > 0.5
    # Positions with an ignored label are padding: moekit keeps them out of the decoder's MoE layers (they get no
    # routed output), transformers routes them; every other position is compared.
    rel = _max_rel(_real(got.logits_BTV, y), _real(ref.logits, y))
    assert rel < RTOL, (kind, rel)
    if not mk.moe_layers:
        assert _max_rel(got.logits_BTV, ref.logits) < RTOL
    torch.testing.assert_close(got.ce_loss, ref.loss, rtol=1e-5, atol=1e-6)
    if mk.moe_layers:  # routing is not trivially uniform
        used = got.encoder_aux[0].routing.expert_ids_SK[mask.reshape(-1).bool()].unique().numel()
        assert used >= 2


def test_moe_layout_follows_the_config(saved):
    kind, hf, path = saved
    mk = from_pretrained(path)
    for stack in ("encoder", "decoder"):
        ours = [any(s.ffn.__class__.__name__ == "MoE" for s in b.ff) for b in getattr(mk, stack).blocks]
        theirs = [getattr(b.layer[-1], "is_sparse", False) for b in getattr(hf, stack).block]
        assert ours == theirs, (kind, stack, ours, theirs)
    if kind == "switch_tied":
        assert read_hf_config(path).config.decoder_moe is not None and mk.config.moe_layers("decoder") == [1]


def test_export_loads_in_transformers_with_equal_logits(saved, tmp_path):
    kind, hf, path = saved
    mk = from_pretrained(path)
    fam = save_pretrained(mk, tmp_path / "export", extra_config=read_hf_config(path).raw)
    assert fam.model_type == KINDS[kind][0]
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export").float().eval()
    assert type(back).__name__ == type(hf).__name__
    x, mask, y = _batch(1)
    with torch.no_grad():
        assert _max_rel(back(input_ids=x, attention_mask=mask, labels=y).logits,
                        hf(input_ids=x, attention_mask=mask, labels=y).logits) < RTOL
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["eos_token_id"] == 1 and cfg["decoder_start_token_id"] == 0


def test_import_export_import_is_bit_identical(saved, tmp_path):
    _, _, path = saved
    a = from_pretrained(path)
    save_pretrained(a, tmp_path / "x")
    b = from_pretrained(tmp_path / "x")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    from safetensors.torch import load_file

    orig, again = load_file(path / "model.safetensors"), load_file(tmp_path / "x" / "model.safetensors")
    for k in orig:  # every tensor transformers wrote is written back with the same values
        assert torch.equal(orig[k], again[k]), k
    assert set(again) - set(orig) <= {"lm_head.weight"}  # an untied head transformers saved as tied is explicit


def test_greedy_generation_matches_transformers(saved):
    kind, hf, path = saved
    mk = from_pretrained(path)
    x, mask, _ = _batch(2)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    got = mk.generate(x, 10, attention_mask=mask, temperature=0)
    assert got.tolist() == ref.tolist(), kind


def _moe(**kw) -> MoEConfig:
    return MoEConfig(**{**dict(d_model=32, d_ff=40, num_experts=4, top_k=1, capacity_factor=None,
                               activation="gelu_tanh"), **kw})


NATIVE = {
    "t5": Seq2SeqConfig(vocab_size=V, d_model=32, d_kv=8, n_heads=4, d_ff=48, n_encoder_layers=2, n_decoder_layers=3,
                        relative_attention_num_buckets=16, relative_attention_max_distance=40, eos_token_id=1),
    # a dense decoder: transformers writes it as num_sparse_decoder_layers > num_layers (step 0)
    "switch_transformers": Seq2SeqConfig(
        vocab_size=V, d_model=32, d_kv=8, n_heads=4, d_ff=40, activation="gelu_tanh", n_encoder_layers=3,
        n_decoder_layers=2, encoder_moe=_moe(), decoder_moe=None, tie_embeddings=True),
}


@pytest.mark.parametrize("model_type", sorted(NATIVE))
def test_a_moekit_model_exports_exactly(model_type, tmp_path):
    torch.manual_seed(0)
    mk = Seq2SeqLM(NATIVE[model_type]).eval()
    with torch.no_grad():
        for m in mk.moe_layers:
            m.router.weight.normal_(0.0, 0.5)
    fam = save_pretrained(mk, tmp_path)
    assert fam.model_type == model_type
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).float().eval()
    x, mask, y = _batch(3)
    with torch.no_grad():
        ref = back(input_ids=x, attention_mask=mask, decoder_input_ids=mk.shift_right(y)).logits
        got = mk(x, attention_mask_BS=mask, decoder_input_ids_BT=mk.shift_right(y)).logits_BTV
    assert _max_rel(got, ref) < RTOL


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 20), (6, 7)])
def test_relative_buckets_equal_transformers(bidirectional, buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                               max_distance=distance)
    got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
    assert torch.equal(got, ref)


def _write_config(path, **overrides) -> None:
    model_type, kwargs = KINDS["switch" if overrides.get("model_type") == "switch_transformers" else "t5_v1_1"]
    cfg = transformers.AutoConfig.for_model(model_type, **COMMON, **kwargs).to_dict()
    cfg.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(feed_forward_proj="gated-relu"), "feed_forward_proj"),
        (dict(model_type="switch_transformers", router_bias=True), "router_bias"),
        (dict(model_type="switch_transformers", dense_act_fn="silu"), "dense_act_fn"),
        (dict(model_type="switch_transformers", router_dtype="float16"), "router_dtype"),
    ],
)
def test_unsupported_configs_refused_in_one_line(tmp_path, overrides, words):
    _write_config(tmp_path, **overrides)
    with pytest.raises(MoekitError) as info:
        read_hf_config(tmp_path)
    assert "\n" not in str(info.value) and words in str(info.value)


@pytest.mark.parametrize(
    "config, words",
    [
        (Seq2SeqConfig(vocab_size=V, d_model=32, encoder_moe=_moe(top_k=2), activation="gelu_tanh"), "top-1"),
        (Seq2SeqConfig(vocab_size=V, d_model=32, encoder_moe=_moe(activation="geglu_tanh")), "gated"),
        (Seq2SeqConfig(vocab_size=V, d_model=32, dense_before_moe=True), "dense_before_moe"),
        (Seq2SeqConfig(vocab_size=V, d_model=32, encoder_moe=_moe(d_ff=16), activation="gelu_tanh", d_ff=40),
         "width"),
    ],
)
def test_unrepresentable_models_refused_in_one_line(tmp_path, config, words):
    with pytest.raises(MoekitError) as info:
        save_pretrained(Seq2SeqLM(config), tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and words in msg, msg
    assert not (tmp_path / "config.json").exists()


def test_separate_embeddings_refused(tmp_path):
    hf = tiny_seq2seq("switch")
    with torch.no_grad():
        hf.encoder.embed_tokens.weight.add_(1.0)
    hf.save_pretrained(tmp_path)
    with pytest.raises(MoekitError, match="differs from shared.weight"):
        from_pretrained(tmp_path)
