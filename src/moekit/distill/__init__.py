"""Sparse-to-dense distillation (Switch Transformer section 4.2): the FLOP-matched dense student, initialised from
the teacher's non-expert weights, trained on ``0.75 * CE(labels) + 0.25 * CE(teacher probabilities)``, for a decoder
LM and for an encoder-decoder (T5 / Switch). The run driver of ``moekit distill`` is :mod:`moekit.lab.distill.run`."""

from moekit.distill.loss import HARD_WEIGHT, DistillLoss, distillation_loss
from moekit.distill.model import DistilledLM, DistilledSeq2Seq
from moekit.distill.student import (
    INIT_METHODS,
    copy_non_expert_weights,
    init_seq2seq_student_ffns,
    init_student_ffns,
    seq2seq_student_config,
    student_config,
)

__all__ = [
    "HARD_WEIGHT",
    "INIT_METHODS",
    "DistillLoss",
    "DistilledLM",
    "DistilledSeq2Seq",
    "copy_non_expert_weights",
    "distillation_loss",
    "init_seq2seq_student_ffns",
    "init_student_ffns",
    "seq2seq_student_config",
    "student_config",
]
