"""The adapter router: ``s = softmax(a @ W_r)`` in float32, soft or top-k, on tokens or on the sentence mean.

Shape legend: ``...`` leading batch dims, ``S`` sequence, ``D`` router input width, ``E`` experts.

Why float32: the softmax over router logits is the numerically sensitive step (docs/ALGORITHMS.md section 5 and the
ST-MoE lesson); in bfloat16 small logit differences vanish and the mixture collapses. No bias, init N(0,
0.02^2), no jitter and no auxiliary loss, as in the MoV/MoLoRA paper.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.adapters.recording import RouterRecorder


class AdapterRouter(nn.Module):
    """Maps a site's activation ``a_...D`` to mixing weights ``gates_...E`` (float32, rows sum to 1).

    With ``router_input="sentence"`` the input must be ``[B, S, D]``; the router sees the mean over S
    (masked by ``sequence_mask`` when one is set, see :func:`moekit.adapters.set_sequence_mask`) and
    returns ``[B, 1, E]``, which broadcasts over the tokens.
    """

    def __init__(self, d_in: int, num_experts: int, routing: str = "soft", top_k: int = 2,
                 router_input: str = "token") -> None:
        super().__init__()
        self.weight_DE = nn.Parameter(torch.empty(d_in, num_experts, dtype=torch.float32))
        nn.init.normal_(self.weight_DE, mean=0.0, std=0.02)
        self.routing = routing
        self.top_k = top_k
        self.router_input = router_input
        # Plain attributes, not buffers: per-forward context, never saved.
        self.sequence_mask: torch.Tensor | None = None
        self.recorder: RouterRecorder | None = None
        self.site_name = ""

    def forward(self, a_xD: torch.Tensor) -> torch.Tensor:
        a32_xD = a_xD.float()  # float32 routing, see the module docstring
        mask_BS = self.sequence_mask
        if self.router_input == "sentence":
            if a32_xD.dim() != 3:
                raise ValueError(f"sentence-level routing needs a [batch, seq, dim] input, "
                                 f"got {tuple(a_xD.shape)}")
            if mask_BS is not None and mask_BS.shape == a32_xD.shape[:2]:
                w_BS1 = mask_BS.to(a32_xD.dtype).unsqueeze(-1)
                a32_xD = (a32_xD * w_BS1).sum(1, keepdim=True) / w_BS1.sum(1, keepdim=True).clamp_min(1.0)
            else:
                a32_xD = a32_xD.mean(1, keepdim=True)
        probs_xE = torch.softmax(a32_xD @ self.weight_DE, dim=-1)
        if self.recorder is not None:
            self.recorder.add(self.site_name, probs_xE.detach(), mask_BS)
        return mix_gates(probs_xE, self.routing, self.top_k)


def mix_gates(probs_xE: torch.Tensor, routing: str, top_k: int) -> torch.Tensor:
    """The mixing weights from router probabilities: all of them (``"soft"``) or the renormalised top k."""
    if routing == "soft":
        return probs_xE
    # Top-k: keep the k largest probabilities and renormalise them, so the gates still sum to 1 and the
    # adapter stays the identity at init (every expert starts equal).
    top_xK, ids_xK = probs_xE.topk(top_k, dim=-1)
    return torch.zeros_like(probs_xE).scatter(-1, ids_xK, top_xK / top_xK.sum(-1, keepdim=True))
