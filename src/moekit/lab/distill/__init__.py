"""``moekit distill``: the end-to-end distillation run (teacher run directory in, student run directory out)."""

from moekit.lab.distill.run import distill_run, evaluate_lm, gain_kept

__all__ = ["distill_run", "evaluate_lm", "gain_kept"]
