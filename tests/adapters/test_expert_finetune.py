"""End to end: LoRA on the experts of a tiny random MoE LM, trained through the Python API, then merged.

For a transformers ``Qwen3MoeForCausalLM`` (built from a config: nothing downloads) and for a moekit
``TransformerLM`` with SwiGLU MoE layers: a few AdamW steps on one batch of random tokens lower the loss, change
only the adapter tensors, and the merged model computes what the adapted one computes.
"""

from __future__ import annotations

import torch
from _adapter_models import tiny_moe_lm

from moekit import MoEConfig
from moekit.adapters import LoRAConfig, adapter_sites, apply_adapters, iter_adapters, merge_adapters
from moekit.models.config import LMConfig
from moekit.models.lm import TransformerLM

STEPS = 8


def _finetune(model: torch.nn.Module, loss_fn, logits_fn) -> list[str]:
    """Train LoRA on the experts, check it, merge; returns the names of the parameters merging changed."""
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_adapters(model, LoRAConfig(r=4, alpha=8.0), ["experts"])
    adapters = {f"{n}.{k}": p for n, _, a in iter_adapters(model) for k, p in a.named_parameters()}
    before = {k: p.detach().clone() for k, p in adapters.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapters.values()}
    opt = torch.optim.AdamW(trainable, lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"frozen {name} changed"
    assert all(not torch.equal(p, before[k]) for k, p in adapters.items())
    with torch.no_grad():
        y_adapted = logits_fn(model)
        merge_adapters(model)
        assert not adapter_sites(model)
        torch.testing.assert_close(logits_fn(model), y_adapted, rtol=1e-4, atol=1e-4)
    # Merging changed only the expert banks' tensors.
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, base[n]))
    assert changed and all(".experts." in n for n in changed), changed
    return changed


def test_finetune_qwen3_moe_lora_on_experts():
    model = tiny_moe_lm("qwen3_moe", layers=2)
    ids_BS = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    changed = _finetune(model, lambda m: m(input_ids=ids_BS, labels=ids_BS).loss,
                        lambda m: m(input_ids=ids_BS).logits)
    assert {n.split(".experts.")[0] for n in changed} == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_finetune_moekit_lm_lora_on_experts():
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, capacity_factor=None, activation="swiglu",
                    jitter_eps=0.0)
    model = TransformerLM(LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16,
                                   activation="swiglu", moe=moe, moe_every=1, moe_offset=0)).eval()
    tokens_BT = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    changed = _finetune(model, lambda m: m(tokens_BT[:, :-1], tokens_BT[:, 1:]).ce_loss,
                        lambda m: m(tokens_BT[:, :-1]).logits_BTV)
    assert {n.split(".experts.")[0] for n in changed} == {"blocks.0.ffn", "blocks.1.ffn"}
