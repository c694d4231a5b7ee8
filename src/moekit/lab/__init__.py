"""The moekit application ("lab"): the ``moekit`` command line and everything only it needs — run configs and the
run driver, ``compare``, plots, corpora, downloads and the tokenizer, image data set readers, the routing report,
distillation and fine-tuning experiments, and the layer benchmark.

The reusable core (layers, routing, dispatch, experts, models, the trainer, adapters, distillation losses, routing
traces and statistics) lives in ``moekit`` outside this package and never imports it. Process-wide settings
(thread count, glibc malloc tuning, matplotlib's backend) are applied by the command line only
(:mod:`moekit.lab.cli`, :mod:`moekit.lab.runtime`).
"""
