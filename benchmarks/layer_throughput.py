"""MoE layer throughput vs a FLOP-matched dense FFN, one-hot einsum, per-expert loop and transformers' Mixtral block.

Run: ``python benchmarks/layer_throughput.py [moekit bench options]``. Unlike ``moekit bench`` (which writes to a new
``runs/bench-<time>/`` folder), this script is how the committed ``benchmarks/results/layer_throughput.{md,json}``
of this repository are regenerated: it passes ``--out <repository>/benchmarks/results`` unless ``--out`` is given.
The committed results were made with ``python benchmarks/layer_throughput.py --activations swiglu geglu
--variants moe dense hf_grouped hf_eager --slow-peers-max-experts 8`` on a 2-core machine with nothing else running
(about 30 minutes; see their header for date and machine).
"""

import sys
from pathlib import Path

from moekit.lab.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(RESULTS)]
    sys.exit(main(["bench", *args]))
