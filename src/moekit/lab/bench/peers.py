"""Baseline formulations the layer benchmark measures moekit against, written here from their published
descriptions (docs/ALGORITHMS.md sections 8.5 and 17.1):

- ``EinsumMoE``: the GShard / Switch (Mesh-TensorFlow) formulation: a one-hot ``dispatch[S, E, C]`` tensor built from
  cumulative positions, einsums into a padded ``[E, C, D]`` buffer, a batched matmul, and an einsum back. Static
  shapes (what TPUs need), at O(S * E * C) memory and FLOPs.
- ``LoopMoE``: the Hugging Face Mixtral eager block's method: a one-hot expert mask, then a Python loop over the
  experts that were hit, each gathering its tokens (``where``), running its own linear layers and ``index_add``-ing
  the gate-weighted result back.

Both share the router weight and expert weights of a moekit ``MoE`` so all three compute the same function (up to
the einsum's capacity drops), which the benchmark checks before timing.

And Hugging Face transformers' own ``MixtralSparseMoeBlock`` (``hf_mixtral``), built from the same weights: its
experts run by ``config._experts_implementation`` ("eager": the per-expert loop above, "grouped_mm": one sort and
``torch._grouped_mm`` over a fused ``gate_up_proj`` ``[E, 2F, D]``). transformers is optional: :func:`hf_unavailable`
says why the peer cannot run.

Shape legend: S tokens, D width, F expert hidden, E experts, K choices, C capacity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.experts.activations import ACTIVATIONS
from moekit.layers.moe import MoE

__all__ = ["HF_ACTIVATIONS", "EinsumMoE", "HFMixtral", "LoopMoE", "hf_unavailable"]


def _route(x_SD: Tensor, weight_ED: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    logits_SE = x_SD.float() @ weight_ED.float().t()
    probs_SE = torch.softmax(logits_SE, dim=-1)
    gates_SK, ids_SK = torch.topk(probs_SE, k, dim=-1)
    if normalize:
        gates_SK = gates_SK / (gates_SK.sum(-1, keepdim=True) + 1e-9)
    return probs_SE, gates_SK, ids_SK


class EinsumMoE(nn.Module):
    """One-hot dispatch / combine einsums at a fixed capacity factor (GShard / Switch reference formulation)."""

    def __init__(self, source: MoE, capacity_factor: float = 1.25) -> None:
        super().__init__()
        c = source.config
        self.k, self.E, self.cf = c.top_k, c.num_experts, capacity_factor
        self.normalize = source.router.normalize_gates
        self.act = ACTIVATIONS[c.activation]
        self.router_weight = nn.Parameter(source.router.weight.detach().clone())
        self.w_in = nn.Parameter(source.experts.w_in.detach().clone())
        w_gate = source.experts.w_gate
        self.w_gate = nn.Parameter(w_gate.detach().clone()) if w_gate is not None else None
        self.w_out = nn.Parameter(source.experts.w_out.detach().clone())

    def forward(self, x_SD: Tensor) -> Tensor:
        S = x_SD.shape[0]
        C = min(S, max(4, math.ceil(self.cf * self.k * S / self.E)))
        _, gates_SK, ids_SK = _route(x_SD, self.router_weight, self.k, self.normalize)
        gates_SK = gates_SK.to(x_SD.dtype)
        combine_SEC = x_SD.new_zeros(S, self.E, C)
        used_E = torch.zeros(self.E, dtype=torch.long, device=x_SD.device)
        for r in range(self.k):  # all first choices claim slots before any second choice
            onehot_SE = torch.nn.functional.one_hot(ids_SK[:, r], self.E)
            pos_SE = torch.cumsum(onehot_SE, dim=0) - 1 + used_E
            used_E = used_E + onehot_SE.sum(0)
            pos_S = (pos_SE * onehot_SE).sum(-1)
            keep_S = pos_S < C
            onehot_SC = torch.nn.functional.one_hot(pos_S.clamp(max=C - 1), C) * keep_S.unsqueeze(-1)
            mask_SEC = (onehot_SE.unsqueeze(-1) * onehot_SC.unsqueeze(1)).to(x_SD.dtype)
            combine_SEC = combine_SEC + gates_SK[:, r, None, None] * mask_SEC
        dispatch_SEC = (combine_SEC > 0).to(x_SD.dtype)
        xin_ECD = torch.einsum("sec,sd->ecd", dispatch_SEC, x_SD)
        h_ECF = torch.einsum("ecd,edf->ecf", xin_ECD, self.w_in)
        if self.w_gate is not None:
            h_ECF = self.act(torch.einsum("ecd,edf->ecf", xin_ECD, self.w_gate)) * h_ECF
        else:
            h_ECF = self.act(h_ECF)
        out_ECD = torch.einsum("ecf,efd->ecd", h_ECF, self.w_out)
        return torch.einsum("sec,ecd->sd", combine_SEC, out_ECD)


class LoopMoE(nn.Module):
    """Per-expert loop over separate parameters with ``where`` / ``index_add_`` (the HF Mixtral eager method)."""

    def __init__(self, source: MoE) -> None:
        super().__init__()
        c = source.config
        self.k, self.E = c.top_k, c.num_experts
        self.normalize = source.router.normalize_gates
        self.act = ACTIVATIONS[c.activation]
        self.router_weight = nn.Parameter(source.router.weight.detach().clone())
        # One (w_in, w_out) pair per expert, as a ModuleList of expert MLPs would hold them.
        self.w_in = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in source.experts.w_in])
        self.w_out = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in source.experts.w_out])
        w_gate = source.experts.w_gate
        self.w_gate = (
            nn.ParameterList([nn.Parameter(w.detach().clone()) for w in w_gate]) if w_gate is not None else None
        )

    def forward(self, x_SD: Tensor) -> Tensor:
        _, gates_SK, ids_SK = _route(x_SD, self.router_weight, self.k, self.normalize)
        out_SD = torch.zeros_like(x_SD)
        mask_EKS = torch.nn.functional.one_hot(ids_SK, self.E).permute(2, 1, 0)
        hit = torch.nonzero(mask_EKS.sum(dim=(-1, -2)) > 0).flatten().tolist()  # one host sync, as in HF
        for e in hit:
            rank_idx, tok_idx = torch.where(mask_EKS[e])
            x_e = x_SD[tok_idx]
            h = x_e @ self.w_in[e]
            h = self.act(x_e @ self.w_gate[e]) * h if self.w_gate is not None else self.act(h)
            y = (h @ self.w_out[e]) * gates_SK[tok_idx, rank_idx, None].to(x_SD.dtype)
            out_SD.index_add_(0, tok_idx, y)
        return out_SD


# moekit activation -> the ``hidden_act`` of a Mixtral block computing the same gated FFN (``act(x W_gate) * x W_up``).
# Mixtral's experts are always gated, so ungated moekit activations have no Mixtral peer.
HF_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}


def hf_unavailable(activation: str) -> str | None:
    """Why the transformers peer cannot run for this activation (one line), or None when it can."""
    if activation not in HF_ACTIVATIONS:
        return f"transformers' Mixtral block is gated only: no peer for activation {activation!r}"
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except ImportError as exc:  # optional dependency
        return f"transformers not importable ({exc.__class__.__name__}: {exc})"
    return None


class HFMixtral(nn.Module):
    """transformers' ``MixtralSparseMoeBlock`` holding a moekit ``MoE``'s weights, on ``[S, D]`` rows.

    Its router is moekit's (softmax, top-k, renormalised: the moekit layer must use ``normalize_gates=True``);
    ``gate_up_proj[e]`` is ``[w_gate[e] | w_in[e]]^T`` (the first F outputs go through the activation) and
    ``down_proj[e]`` is ``w_out[e]^T``.
    """

    def __init__(self, source: MoE, implementation: str) -> None:
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        c = source.config
        if c.activation not in HF_ACTIVATIONS or source.experts.w_gate is None:
            raise ValueError(f"no Mixtral block computes activation {c.activation!r}")
        cfg = MixtralConfig(
            hidden_size=c.d_model, intermediate_size=c.d_ff, num_local_experts=c.num_experts,
            num_experts_per_tok=c.top_k, hidden_act=HF_ACTIVATIONS[c.activation], router_jitter_noise=0.0,
        )
        cfg._experts_implementation = implementation
        self.implementation = implementation
        self.block = MixtralSparseMoeBlock(cfg)
        bank = source.experts
        with torch.no_grad():
            self.block.gate.weight.copy_(source.router.weight)
            self.block.experts.gate_up_proj.copy_(torch.cat([bank.w_gate, bank.w_in], dim=-1).transpose(1, 2))
            self.block.experts.down_proj.copy_(bank.w_out.transpose(1, 2))

    def forward(self, x_SD: Tensor) -> Tensor:
        return self.block(x_SD.unsqueeze(0)).squeeze(0)
