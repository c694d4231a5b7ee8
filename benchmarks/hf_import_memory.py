"""Peak memory of ``moekit.hf.from_pretrained`` on a ~230 MB random Qwen3-MoE checkpoint.

A child process imports moekit, records its resident memory (the baseline: Python, torch), loads the checkpoint and
records its peak resident memory (``VmHWM`` of /proc/self/status; ``ru_maxrss`` would include the parent's memory
at the fork). The figure is (peak - baseline) / checkpoint bytes: 1.0 would be
the model alone. Reading a tensor at a time with plain file reads keeps it near 1 (a memory-mapped load counts the
mapped file as well). Writes ``benchmarks/results/hf_import_memory.md``.

    .venv/bin/python benchmarks/hf_import_memory.py
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "hf_import_memory.md"

CHILD = r"""
import json, sys, time
import torch
import moekit.hf
torch.set_num_threads(1)
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
base_rss = status_mb("VmRSS")
base_peak = status_mb("VmHWM")
t0 = time.perf_counter()
model = moekit.hf.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - t0
peak = status_mb("VmHWM")
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"base_rss_mb": base_rss, "base_peak_mb": base_peak, "peak_mb": peak, "end_rss_mb": status_mb("VmRSS"),
                  "model_mb": params, "seconds": seconds}))
"""


def main() -> None:
    import torch

    from moekit.hf import save_pretrained
    from moekit.layers.config import MoEConfig
    from moekit.models import LMConfig, TransformerLM

    torch.manual_seed(0)
    moe = MoEConfig(d_model=384, d_ff=384, num_experts=8, top_k=2, capacity_factor=None, activation="swiglu",
                    normalize_gates=True)
    cfg = LMConfig(vocab_size=32000, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, head_dim=64, qk_norm="head",
                   d_ff=1024, max_seq_len=512, activation="swiglu", moe=moe, moe_every=1, moe_offset=0,
                   tie_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(TransformerLM(cfg), tmp, model_type="qwen3_moe")
        size_mb = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, tmp], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (r["peak_mb"] - r["base_rss_mb"]) / size_mb
    lines = [
        "# Peak memory of importing a Hugging Face checkpoint",
        "",
        "`.venv/bin/python benchmarks/hf_import_memory.py` (a random Qwen3-MoE of 8 layers, 8 experts, float32).",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "",
        "| checkpoint | model in memory | resident before | peak | peak - before | (peak - before) / checkpoint "
        "| load time |",
        "|---|---|---|---|---|---|---|",
        f"| {size_mb:.0f} MB | {r['model_mb']:.0f} MB | {r['base_rss_mb']:.0f} MB | {r['peak_mb']:.0f} MB | "
        f"{r['peak_mb'] - r['base_rss_mb']:.0f} MB | **{ratio:.2f}x** | {r['seconds']:.1f} s |",
        "",
        "Resident before: Python, torch and moekit imported. The model is built (its random initial weights are the",
        "1x); each tensor is then read from its file straight into its parameter when the layouts agree, or into a",
        "transient buffer and copied (transposed feed-forward and expert weights, dtype changes).",
    ]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
