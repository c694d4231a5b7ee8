"""``DistilledLM``: a dense ``TransformerLM`` whose training loss is the distillation mix against a frozen teacher.

Subclassing keeps the student's ``state_dict`` exactly a ``TransformerLM``'s, so the trainer's optimizer, schedule,
checkpoints and evaluation are reused unchanged and a distilled run directory loads with ``moekit eval`` and
``moekit generate`` like any dense run. The teacher is held outside the module tree (not a submodule): its
weights are not trained, not saved in the student's checkpoints, and stay in eval mode (no router jitter) when the
trainer switches the student between train and eval.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.distill.loss import HARD_WEIGHT, distillation_loss
from moekit.models import LMOutput, TransformerLM
from moekit.models.config import LMConfig

__all__ = ["DistilledLM"]


class DistilledLM(TransformerLM):
    """In training mode with targets, ``out.loss`` is ``0.75 * CE(labels) + 0.25 * CE(teacher probabilities)``;
    ``out.ce_loss`` stays the plain label cross-entropy (what validation reports). In eval mode it is a plain
    dense LM."""

    def __init__(self, config: LMConfig, teacher: TransformerLM | None = None,
                 hard_weight: float = HARD_WEIGHT) -> None:
        super().__init__(config)
        self.hard_weight = float(hard_weight)
        self.set_teacher(teacher)

    def set_teacher(self, teacher: TransformerLM | None) -> None:
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # bypass nn.Module registration on purpose

    @property
    def teacher(self) -> TransformerLM | None:
        return self._teacher

    def forward(self, tokens_BT: Tensor, targets_BT: Tensor | None = None) -> LMOutput:
        out = super().forward(tokens_BT, targets_BT)
        if targets_BT is None or not self.training or self._teacher is None or self.hard_weight >= 1.0:
            return out  # (hard_weight 1 is the "no teacher" ablation: plain continued training)
        with torch.no_grad():
            teacher_logits_BTV = self._teacher(tokens_BT).logits_BTV
        mix = distillation_loss(out.logits_BTV, teacher_logits_BTV, targets_BT, self.hard_weight)
        out.ce_loss = mix.hard_ce
        out.loss = mix.loss  # a dense student has no balance or z-loss terms
        out.soft_ce = mix.soft_ce  # type: ignore[attr-defined]
        return out
