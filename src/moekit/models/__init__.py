"""Models built from moekit layers: the decoder-only language model (dense or MoE FFNs)."""

from moekit.models.config import LMConfig
from moekit.models.flops import flop_matched_dense, flops_per_token, parameter_counts
from moekit.models.lm import LMOutput, TransformerLM

__all__ = [
    "LMConfig",
    "LMOutput",
    "TransformerLM",
    "flop_matched_dense",
    "flops_per_token",
    "parameter_counts",
]
