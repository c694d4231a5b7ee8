"""Routing analysis of trained MoE models (the reusable part): per-token routing traces read from the layers' own
forward pass, and pure-numpy statistics over them (expert load and drops, router entropy, the tokens each expert
sees, category specialisation with significance scores, routing agreement across layers). The token categories,
the summary and the HTML report of ``moekit analyze`` are in :mod:`moekit.lab.analysis`."""

from moekit.analysis.trace import RoutingTrace, iter_windows, trace_model

__all__ = ["RoutingTrace", "iter_windows", "trace_model"]
