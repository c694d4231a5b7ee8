"""``moekit analyze``: ST-MoE style token categories, the per-run summary of a routing trace and the self-contained
HTML report (the trace and the statistics themselves are in the core :mod:`moekit.analysis`)."""

from moekit.lab.analysis.categories import CATEGORIES, FUNCTION_WORDS, categorize, category_of, piece_text
from moekit.lab.analysis.pipeline import analyze_run
from moekit.lab.analysis.report import expert_name, render_report
from moekit.lab.analysis.summary import summarise

__all__ = [
    "CATEGORIES",
    "FUNCTION_WORDS",
    "analyze_run",
    "categorize",
    "category_of",
    "expert_name",
    "piece_text",
    "render_report",
    "summarise",
]
