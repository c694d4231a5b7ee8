"""GPU MoE layer benchmark (bf16, forward + backward): moekit vs a FLOP-matched dense FFN, the HF Mixtral
per-expert loop, and the GShard/Switch one-hot einsum; achieved TFLOP/s and ratios to dense.

Cases (issue: GPU fast path):
  (a) Mixtral-like: d_model 4096, d_ff 14336, 8 experts, top-2, 8192 tokens, SwiGLU
  (b) fine-grained: d_model 2048, d_ff 1408, 64 experts, top-6, 16384 tokens, SwiGLU
Targets: moe reaches >= 70% of dense TFLOP/s in (a), >= 50% in (b), and is >= 2x faster than the loop in (b).

Run on a GPU machine (about 3 minutes on one H100/H200):
    python benchmarks/gpu_layer.py --out benchmarks/results
CPU smoke test of the script itself (tiny shapes): python benchmarks/gpu_layer.py --device cpu --small

FLOPs counted are the useful ones, identical for every variant: 3 (fwd + 2x bwd) * 2 * tokens * k * 3 * d * f
(three SwiGLU matrices); the einsum's extra dispatch FLOPs and padding are not credited.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moekit import MoE, MoEConfig
from moekit.lab.bench.peers import EinsumMoE, LoopMoE
from moekit.layers import DenseFFN

CASES = {
    "a": dict(d_model=4096, d_ff=14336, num_experts=8, top_k=2, tokens=8192),
    "b": dict(d_model=2048, d_ff=1408, num_experts=64, top_k=6, tokens=16384),
}
SMALL = {
    "a": dict(d_model=64, d_ff=96, num_experts=8, top_k=2, tokens=256),
    "b": dict(d_model=32, d_ff=48, num_experts=16, top_k=4, tokens=512),
}
VARIANTS = ("moe", "dense", "loop", "einsum")


def build(variant: str, case: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=case["d_model"], d_ff=case["d_ff"], num_experts=case["num_experts"],
                        top_k=case["top_k"], capacity_factor=None, activation="swiglu"))
    if variant == "moe":
        mod = moe
    elif variant == "dense":
        mod = DenseFFN(case["d_model"], case["top_k"] * case["d_ff"], "swiglu")
    elif variant == "loop":
        mod = LoopMoE(moe)
    elif variant == "einsum":
        mod = EinsumMoE(moe, capacity_factor=1.25)
    else:
        raise ValueError(variant)
    return mod.to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(mod: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int, device) -> list[float]:
    def step() -> None:
        out = mod(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad)

    for _ in range(3):
        mod.zero_grad(set_to_none=False)
        step()
    times = []
    for _ in range(iters):
        mod.zero_grad(set_to_none=False)
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test on CPU)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cases", nargs="+", default=["a", "b"], choices=sorted(CASES))
    ap.add_argument("--out", default=None, help="directory for gpu_layer_<device>.md / .json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or use --device cpu --small for a smoke test")
        return 2
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows, results = [], {"device": name, "torch": torch.__version__, "cases": {}}
    for key in args.cases:
        case = (SMALL if args.small else CASES)[key]
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(case["tokens"], case["d_model"], generator=g).to(device, dtype).requires_grad_(True)
        grad = torch.randn(case["tokens"], case["d_model"], generator=g).to(device, dtype)
        flops = 3 * 2 * case["tokens"] * case["top_k"] * 3 * case["d_model"] * case["d_ff"]
        res = {}
        for v in VARIANTS:
            try:
                mod = build(v, case, device, dtype)
                if v == "moe":
                    from moekit.ops import pick_backend

                    res["moe_backend"] = pick_backend(x[:8].detach(), mod.experts.w_in.detach())
                t = statistics.median(time_variant(mod, x, grad, args.iters, device))
                res[v] = {"ms": t * 1e3, "tflops": flops / t / 1e12}
                del mod
            except torch.OutOfMemoryError:
                res[v] = {"ms": float("nan"), "tflops": float("nan"), "error": "out of memory"}
            x.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"case {key} {v:7s} {res[v]['ms']:9.2f} ms  {res[v]['tflops']:7.1f} TFLOP/s", flush=True)
        d = res["dense"]["tflops"]
        res["moe_over_dense_tflops"] = res["moe"]["tflops"] / d
        res["loop_over_moe_time"] = res["loop"]["ms"] / res["moe"]["ms"]
        res["einsum_over_moe_time"] = res["einsum"]["ms"] / res["moe"]["ms"]
        results["cases"][key] = {"shape": case, **res}
        rows.append(
            f"| {key} | {case['d_model']} | {case['d_ff']} | {case['num_experts']} | {case['top_k']} | "
            f"{case['tokens']} | " + " | ".join(f"{res[v]['ms']:.2f} ({res[v]['tflops']:.0f})" for v in VARIANTS)
            + f" | {res['moe_over_dense_tflops']:.2f} | {res['loop_over_moe_time']:.2f} | "
            f"{res['einsum_over_moe_time']:.2f} |"
        )
    md = "\n".join([
        f"# GPU MoE layer benchmark: {name}",
        "",
        f"bf16, forward + backward, SwiGLU experts, median of {args.iters} after 3 warm-up steps; torch "
        f"{torch.__version__}. Cells: ms (TFLOP/s of useful work). Command: `python benchmarks/gpu_layer.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| case | d_model | d_ff | E | k | tokens | moe | dense | loop | einsum | moe/dense TFLOP/s | loop/moe | "
        "einsum/moe |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "gpu_layer_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
        (out / f"{stem}.md").write_text(md)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
