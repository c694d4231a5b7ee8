"""The whole path of issue "adapters on expert banks" for an imported model: a tiny random Qwen3-MoE imported with
``moekit.hf.from_pretrained``, LoRA on its experts trained for a few steps through the Python API, merged, and
exported with ``save_pretrained``; transformers then computes the merged model's logits."""

from __future__ import annotations

import pytest
import torch

from moekit.adapters import LoRAConfig, apply_adapters, iter_adapters, merge_adapters
from moekit.hf import from_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
from tests.hf._tiny import tiny_hf_model  # noqa: E402


def test_lora_on_imported_experts_trains_merges_and_exports(tmp_path):
    tiny_hf_model("qwen3_moe").save_pretrained(tmp_path / "src")
    model = from_pretrained(tmp_path / "src").train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_adapters(model, LoRAConfig(r=4, alpha=8.0), ["experts"])
    sites = [name for name, _, _ in iter_adapters(model)]
    assert sites == ["blocks.1.ffn.experts", "blocks.3.ffn.experts"]  # the two MoE blocks of the config
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-2, weight_decay=0.0)
    tokens = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        loss = model(tokens[:, :-1], tokens[:, 1:]).ce_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with torch.no_grad():
        adapted = model(tokens).logits_BTV
        merge_adapters(model)
        merged = model(tokens).logits_BTV
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, base[n]))
    assert changed and all(".experts." in n for n in changed), changed
    save_pretrained(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        hf_logits = back(tokens).logits
    assert (hf_logits - merged).abs().max() / merged.abs().max() < 1e-4
