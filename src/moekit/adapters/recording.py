"""Recording router probabilities per adapter site, for analysis (the paper's expert-specialisation figure).

No global state: a :class:`RouterRecorder` is attached to the routers of one model for the duration of a
``with`` block and accumulates, per site, the sum of router probabilities and the number of tokens (or
sentences) seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class RouterRecorder:
    """Running per-site sums of softmax router probabilities; ``mean()`` gives ``{site: probs_E}``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}

    def add(self, site: str, probs_xE: torch.Tensor, mask_BS: torch.Tensor | None = None) -> None:
        """Adds probabilities of shape ``[..., E]``; a ``[B, S]`` mask drops padding tokens when shapes
        agree."""
        probs_NE = probs_xE.reshape(-1, probs_xE.shape[-1]).float()
        if mask_BS is not None and probs_xE.dim() == 3 and probs_xE.shape[:2] == mask_BS.shape:
            probs_NE = probs_NE[mask_BS.reshape(-1).bool()]
        self.sums[site] = self.sums.get(site, 0) + probs_NE.sum(0).cpu()
        self.counts[site] = self.counts.get(site, 0.0) + float(probs_NE.shape[0])

    def mean(self) -> dict[str, torch.Tensor]:
        return {site: s / max(self.counts[site], 1.0) for site, s in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def _routers(model: nn.Module) -> list[nn.Module]:
    from moekit.adapters.bank import BankRouter
    from moekit.adapters.router import AdapterRouter

    return [m for m in model.modules() if isinstance(m, (AdapterRouter, BankRouter))]


@contextmanager
def record_router_probs(model: nn.Module, recorder: RouterRecorder | None = None) -> Iterator[RouterRecorder]:
    """``with record_router_probs(model) as rec: model(x)`` then ``rec.mean()`` -> ``{site name:
    probs_E}``."""
    rec = recorder if recorder is not None else RouterRecorder()
    routers = _routers(model)
    for r in routers:
        r.recorder = rec
    try:
        yield rec
    finally:
        for r in routers:
            r.recorder = None


def set_sequence_mask(model: nn.Module, mask_BS: torch.Tensor | None) -> None:
    """Tells every router which tokens are real (1) or padding (0) for the next forward passes.

    Used by sentence-level routing (the mean skips padding) and by recording (padding is not counted).
    ``None`` clears it. Token-level routing itself does not need it: each token is routed on its own.
    Expert-bank routers ignore it: their rows are tokens of many sequences (a recorder counts every routed row).
    """
    for r in _routers(model):
        r.sequence_mask = mask_BS
