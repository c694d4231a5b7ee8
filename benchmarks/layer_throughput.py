"""MoE layer throughput vs a FLOP-matched dense FFN, one-hot einsum and per-expert loop (``moekit bench``).

Run: ``python benchmarks/layer_throughput.py`` (same options as ``moekit bench``); results go to
``benchmarks/results/layer_throughput.{md,json}``.
"""

import sys

from moekit.lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
