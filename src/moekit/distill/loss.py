"""The distillation loss of Switch Transformer section 4.2: a mix of the usual cross-entropy on the labels and the
cross-entropy against the teacher's predicted distribution.

    L = 0.75 * CE(labels, student) + 0.25 * CE(softmax(teacher), student)

with ``CE(p, q) = -sum_v p_v log q_v`` per token, averaged over tokens; temperature 1 (the paper states none).
The soft term differs from KL(teacher || student) only by the teacher's entropy, a constant for the student, so the
gradients are the same. Computed in float32 from the logits, as the trainer's cross-entropy is. Targets equal to
-100 (an encoder-decoder's ignored labels) count in neither term.

Shape legend: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

__all__ = ["DistillLoss", "distillation_loss", "HARD_WEIGHT", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # targets neither term counts (torch's nll_loss default, the seq2seq loss's convention)
HARD_WEIGHT = 0.75  # Switch 4.2: 0.75 on the labels, 0.25 on the teacher's probabilities


@dataclass
class DistillLoss:
    loss: Tensor
    hard_ce: Tensor
    soft_ce: Tensor


def distillation_loss(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, targets_BT: Tensor, hard_weight: float = HARD_WEIGHT
) -> DistillLoss:
    """``hard_weight * CE(targets) + (1 - hard_weight) * CE(teacher probabilities)``; the teacher gets no gradient."""
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits_BTV.shape)} vs "
            f"{tuple(teacher_logits_BTV.shape)} (same tokenizer needed)"
        )
    V = student_logits_BTV.shape[-1]
    log_q_NV = F.log_softmax(student_logits_BTV.float().reshape(-1, V), dim=-1)
    p_NV = F.softmax(teacher_logits_BTV.detach().float().reshape(-1, V), dim=-1)
    targets_N = targets_BT.reshape(-1)
    hard = F.nll_loss(log_q_NV, targets_N, ignore_index=IGNORE_INDEX)
    soft_N = -(p_NV * log_q_NV).sum(dim=-1)
    keep_N = targets_N != IGNORE_INDEX
    # The plain mean when nothing is ignored (a decoder LM), so its loss is the same to the last bit.
    soft = soft_N.mean() if bool(keep_N.all()) else soft_N[keep_N].mean()
    return DistillLoss(hard_weight * hard + (1.0 - hard_weight) * soft, hard, soft)
