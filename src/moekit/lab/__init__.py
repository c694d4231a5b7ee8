"""The moekit application ("lab"): the ``moekit`` command line and everything only it needs — run configs and the
run driver, ``compare``, plots, corpora, downloads and the tokenizer, image data set readers, the routing report,
distillation and fine-tuning experiments, and the layer benchmark.

The reusable core (layers, routing, dispatch, experts, models, the trainer, adapters, distillation losses, routing
traces and statistics) lives in ``moekit`` outside this package and never imports it. Process-wide settings
(thread count, glibc malloc tuning, matplotlib's backend) are applied by the command line only
(:mod:`moekit.lab.cli`, :mod:`moekit.lab.runtime`).
"""

from typing import Any

__all__ = ["TrainedRun", "load_run", "train"]


def __getattr__(name: str) -> Any:
    # The Python entry points (docs/API.md), imported on first use: ``import moekit.lab`` happens on every
    # ``moekit`` command (for --help too) and must not load torch, the tokenizer and the run driver.
    if name in __all__:
        from moekit.lab import api

        return getattr(api, name)
    raise AttributeError(f"module 'moekit.lab' has no attribute {name!r}")
