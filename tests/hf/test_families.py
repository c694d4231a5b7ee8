"""Import and export of every Hugging Face family is exact: logits equal transformers' on the same weights, an
exported model loads in transformers with equal logits, import -> export -> import is bit-identical, and greedy
decoding (moekit's KV cache) picks the same tokens as transformers' ``generate``."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.hf import from_pretrained, read_hf_config, save_pretrained
from moekit.layers.moe import MoE

transformers = pytest.importorskip("transformers")
from tests.hf._tiny import FAMILIES, tiny_hf_model  # noqa: E402

RTOL = 1e-4


def _tokens(seed: int = 0, batch: int = 2, seq: int = 17) -> torch.Tensor:
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    model_type = request.param
    hf = tiny_hf_model(model_type)
    path = tmp_path_factory.mktemp(model_type)
    hf.save_pretrained(path)
    return model_type, hf, path


def test_import_logits_equal_transformers(saved):
    model_type, hf, path = saved
    mk = from_pretrained(path)
    tokens = _tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
        got = mk(tokens).logits_BTV
    assert ref.abs().max() > 0.5  # O(1) logits, not a degenerate model
    assert _max_rel(got, ref) < RTOL, model_type
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert any(isinstance(b.ffn, MoE) for b in mk.blocks)
        # routing is not trivially uniform: the tokens use most experts of the first MoE layer
        out = mk(tokens)
        used = out.aux[0].routing.expert_ids_SK.unique().numel()
        assert used >= mk.moe_layers[0].num_experts // 2


def test_moe_layout_follows_the_config(saved):
    model_type, hf, path = saved
    ckpt = read_hf_config(path)
    mk_blocks = [isinstance(b.ffn, MoE) for b in from_pretrained(path).blocks]
    hf_blocks = [type(layer.mlp).__name__.endswith(("SparseMoeBlock", "MoE")) for layer in hf.model.layers]
    assert mk_blocks == hf_blocks, (model_type, mk_blocks, hf_blocks)
    if model_type == "qwen2_moe":
        assert mk_blocks == [False, True, True, True] and ckpt.config.dense_layers == [0]
    if model_type == "qwen3_moe":
        assert mk_blocks == [False, True, False, True]


def test_export_loads_in_transformers_with_equal_logits(saved, tmp_path):
    model_type, hf, path = saved
    mk = from_pretrained(path)
    out = tmp_path / "export"
    fam = save_pretrained(mk, out, extra_config=read_hf_config(path).raw)
    assert fam.model_type == model_type  # the inferred family is the original one
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(back).__name__ == type(hf).__name__
    tokens = _tokens(1)
    with torch.no_grad():
        assert _max_rel(back(tokens).logits, hf(tokens).logits) < RTOL
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == 2 and cfg["model_type"] == model_type


def test_import_export_import_is_bit_identical(saved, tmp_path):
    _, _, path = saved
    a = from_pretrained(path)
    save_pretrained(a, tmp_path / "x")
    b = from_pretrained(tmp_path / "x")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the exported files hold the same bytes the transformers checkpoint holds, tensor by tensor
    from safetensors.torch import load_file

    orig, again = load_file(path / "model.safetensors"), load_file(tmp_path / "x" / "model.safetensors")
    assert orig.keys() == again.keys()
    for k in orig:
        assert torch.equal(orig[k], again[k]), k


def test_greedy_generation_matches_transformers(saved):
    model_type, hf, path = saved
    mk = from_pretrained(path)
    prompt = _tokens(2, batch=1, seq=6)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0,
                          eos_token_id=None)
    got = mk.generate(prompt[0], 12, temperature=0)
    assert got.tolist() == ref[0].tolist(), model_type
