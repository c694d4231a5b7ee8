"""Sparse-to-dense distillation (Switch Transformer section 4.2): the FLOP-matched dense student, initialised from
the teacher's non-expert weights, trained on ``0.75 * CE(labels) + 0.25 * CE(teacher probabilities)``. The run
driver of ``moekit distill`` is :mod:`moekit.lab.distill.run`."""

from moekit.distill.loss import HARD_WEIGHT, DistillLoss, distillation_loss
from moekit.distill.model import DistilledLM
from moekit.distill.student import INIT_METHODS, copy_non_expert_weights, init_student_ffns, student_config

__all__ = [
    "HARD_WEIGHT",
    "INIT_METHODS",
    "DistillLoss",
    "DistilledLM",
    "copy_non_expert_weights",
    "distillation_loss",
    "init_student_ffns",
    "student_config",
]
