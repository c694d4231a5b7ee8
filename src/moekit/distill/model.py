"""``DistilledLM``: a dense ``TransformerLM`` whose training loss is the distillation mix against a frozen teacher;
``DistilledSeq2Seq``: the same for a dense ``Seq2SeqLM`` (teacher-forced targets).

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
from moekit.models.seq2seq import Seq2SeqLM, Seq2SeqOutput
from moekit.models.seq2seq_config import Seq2SeqConfig

__all__ = ["DistilledLM", "DistilledSeq2Seq"]


def _frozen(teacher: torch.nn.Module | None) -> torch.nn.Module | None:
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)
    return teacher


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


class DistilledSeq2Seq(Seq2SeqLM):
    """A dense :class:`Seq2SeqLM` student. In training mode with labels, ``out.loss`` is ``0.75 * CE(labels) +
    0.25 * CE(teacher probabilities)`` over the target tokens (labels -100 count in neither term), the teacher
    run on the same encoder inputs and teacher-forced decoder inputs; ``out.ce_loss`` stays the plain label
    cross-entropy. In eval mode it is a plain dense encoder-decoder. Its ``state_dict`` is a ``Seq2SeqLM``'s."""

    def __init__(self, config: Seq2SeqConfig, teacher: Seq2SeqLM | None = None,
                 hard_weight: float = HARD_WEIGHT) -> None:
        super().__init__(config)
        self.hard_weight = float(hard_weight)
        self.set_teacher(teacher)

    def set_teacher(self, teacher: Seq2SeqLM | None) -> None:
        object.__setattr__(self, "_teacher", _frozen(teacher))  # not a submodule: not trained, not saved

    @property
    def teacher(self) -> Seq2SeqLM | None:
        return self._teacher

    def forward(self, input_ids_BS: Tensor, labels_BT: Tensor | None = None, **kwargs: Tensor | None
                ) -> Seq2SeqOutput:
        out = super().forward(input_ids_BS, labels_BT, **kwargs)
        if labels_BT is None or not self.training or self._teacher is None or self.hard_weight >= 1.0:
            return out
        with torch.no_grad():
            # With the labels, so the teacher's decoder keeps ignored targets out of its capacity, as in training.
            teacher_logits_BTV = self._teacher(input_ids_BS, labels_BT, **kwargs).logits_BTV
        mix = distillation_loss(out.logits_BTV, teacher_logits_BTV, labels_BT, self.hard_weight)
        out.ce_loss = mix.hard_ce
        out.loss = mix.loss  # a dense student has no balance or z-loss terms
        out.soft_ce = mix.soft_ce  # type: ignore[attr-defined]
        return out
