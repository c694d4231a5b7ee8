"""Sparse-to-dense distillation (Switch Transformer section 4.2, ``moekit distill``): the FLOP-matched dense
student, initialised from the teacher's non-expert weights, trained on ``0.75 * CE(labels) + 0.25 *
CE(teacher probabilities)``."""

from moekit.distill.loss import HARD_WEIGHT, DistillLoss, distillation_loss
from moekit.distill.model import DistilledLM
from moekit.distill.run import distill_run, evaluate_lm, gain_kept
from moekit.distill.student import INIT_METHODS, copy_non_expert_weights, init_student_ffns, student_config

__all__ = [
    "HARD_WEIGHT",
    "INIT_METHODS",
    "DistillLoss",
    "DistilledLM",
    "copy_non_expert_weights",
    "distill_run",
    "distillation_loss",
    "evaluate_lm",
    "gain_kept",
    "init_student_ffns",
    "student_config",
]
