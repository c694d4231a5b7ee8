"""Naive per-token reference implementations: the ground truth the fast layers are tested against.

Everything here loops over tokens (and their k choices, or each expert's picks) in plain Python, reading
docs/ALGORITHMS.md sections 1 and 3 literally, so that a bug in the sort-based dispatch cannot hide in a shared helper.
Routing math is done in float32 like the router ("selective precision"), expert math in the weights' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTS = {
    "relu": F.relu,
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "swiglu": F.silu,
    "geglu": lambda t: F.gelu(t, approximate="none"),
}


def naive_ffn(x_D: Tensor, w_in: Tensor, w_out: Tensor, w_gate: Tensor | None, activation: str) -> Tensor:
    """One token through one expert: ``act(x W_in) W_out`` or gated ``(act(x W_gate) * x W_in) W_out``."""
    act = ACTS[activation]
    h = x_D @ w_in
    h = act(x_D @ w_gate) * h if w_gate is not None else act(h)
    return h @ w_out


def expert_weights(layer, e: int):
    bank = layer.experts
    w_gate = bank.w_gate[e] if bank.w_gate is not None else None
    return bank.w_in[e], bank.w_out[e], w_gate


def router_probs(x_SD: Tensor, weight_ED: Tensor) -> tuple[Tensor, Tensor]:
    """float32 ``logits = x W^T`` and ``softmax`` over experts (docs/ALGORITHMS.md 1)."""
    logits = F.linear(x_SD.float(), weight_ED.float())
    return logits, torch.softmax(logits, dim=-1)


def naive_token_choice(
    layer,
    x_SD: Tensor,
    *,
    top_k: int,
    capacity: int | None,
    group_size: int | None = None,
    normalize_gates: bool | None = None,
    batch_priority: bool = False,
    valid_SK: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Token-choice MoE by hand: returns ``(y_SD, info)``.

    Priority rule (docs/ALGORITHMS.md 1): within each group, every first choice claims a slot before any second
    choice; within a rank, tokens go in group order (or by descending top-1 probability with batch priority).
    An assignment at position >= C is dropped and contributes 0; kept gates are not renormalised.
    A choice with ``valid_SK`` False (declined by the second-expert policy) takes no slot and contributes 0.
    """
    S, D = x_SD.shape
    E = layer.config.num_experts
    T = S if group_size is None else group_size
    logits, probs = router_probs(x_SD, layer.router.weight)
    gates, ids = torch.topk(probs, top_k, dim=-1)
    if normalize_gates is None:
        normalize_gates = top_k > 1
    if normalize_gates:
        gates = gates / (gates.sum(-1, keepdim=True) + 1e-9)

    kept = torch.zeros(S, top_k, dtype=torch.bool)
    for g in range(S // T):
        tokens = list(range(g * T, (g + 1) * T))
        if batch_priority:
            # Python sort is stable: group order breaks ties.
            tokens.sort(key=lambda t: -float(probs[t].detach().max()))
        used = [0] * E
        for r in range(top_k):
            for t in tokens:
                e = int(ids[t, r])
                if valid_SK is not None and not bool(valid_SK[t, r]):
                    continue
                if capacity is None or used[e] < capacity:
                    used[e] += 1
                    kept[t, r] = True

    rows = []
    for t in range(S):
        y = torch.zeros(D, dtype=x_SD.dtype)
        for r in range(top_k):
            if kept[t, r]:
                e = int(ids[t, r])
                y = y + gates[t, r].to(x_SD.dtype) * naive_ffn(x_SD[t], *expert_weights(layer, e),
                                                                layer.config.activation)
        rows.append(y)
    tokens_per_expert = torch.zeros(E, dtype=torch.int64)
    for t in range(S):
        for r in range(top_k):
            if kept[t, r]:
                tokens_per_expert[int(ids[t, r])] += 1
    info = {
        "logits": logits,
        "probs": probs,
        "ids": ids,
        "gates": gates,
        "kept": kept,
        "num_dropped": int((~kept).sum()) - (0 if valid_SK is None else int((~valid_SK).sum())),
        "tokens_per_expert": tokens_per_expert,
    }
    return torch.stack(rows), info


def naive_expert_choice(layer, x_SD: Tensor, *, capacity_factor: float, group_size: int | None = None):
    """Expert choice by hand (docs/ALGORITHMS.md 3): each expert takes its ``ceil(T*c/E)`` most probable tokens."""
    S, D = x_SD.shape
    E = layer.config.num_experts
    T = S if group_size is None else group_size
    C = min(T, math.ceil(T * capacity_factor / E))
    _, probs = router_probs(x_SD, layer.router.weight)
    contributions: list[list[Tensor]] = [[] for _ in range(S)]
    picked = set()
    for g in range(S // T):
        for e in range(E):
            order = sorted(range(g * T, (g + 1) * T), key=lambda t, e=e: -float(probs[t, e].detach()))
            for t in order[:C]:
                picked.add(t)
                contributions[t].append(
                    probs[t, e].to(x_SD.dtype)
                    * naive_ffn(x_SD[t], *expert_weights(layer, e), layer.config.activation)
                )
    y = torch.stack([sum(c, torch.zeros(D, dtype=x_SD.dtype)) for c in contributions])
    return y, {"capacity": C, "picked": picked, "probs": probs}
