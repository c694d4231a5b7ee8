"""Routing analysis of trained MoE models: per-token routing traces, expert load and drops, router entropy, the
tokens each expert sees, ST-MoE style token-category specialisation with significance scores, routing agreement
across layers, and a self-contained HTML report (``moekit analyze``)."""

from moekit.analysis.categories import CATEGORIES, FUNCTION_WORDS, categorize, category_of, piece_text
from moekit.analysis.pipeline import analyze_run
from moekit.analysis.report import expert_name, render_report
from moekit.analysis.summary import summarise
from moekit.analysis.trace import RoutingTrace, trace_model

__all__ = [
    "CATEGORIES",
    "FUNCTION_WORDS",
    "RoutingTrace",
    "analyze_run",
    "categorize",
    "category_of",
    "expert_name",
    "piece_text",
    "render_report",
    "summarise",
    "trace_model",
]
