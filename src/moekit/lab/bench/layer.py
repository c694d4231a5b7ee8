"""Layer throughput benchmark: moekit's MoE layer against a FLOP-matched dense FFN and two peer formulations.

Forward + backward time of one layer call on S tokens, measured interleaved (each round runs every variant once,
in a rotating order) so that this machine's intermittent slow-downs hit all variants alike; we report medians and
ratios to the dense FFN measured in the same run. Gradients are reset between steps as a trainer would, the same
way for every variant: ``--grad-policy none`` (``zero_grad(set_to_none=True)``, PyTorch's default: autograd hands
the fresh weight gradient over without an extra add) or ``reuse`` (``set_to_none=False``: buffers are zeroed and
the new gradient added into them). Peak memory is measured per variant in a fresh
subprocess (glibc's default allocator) as the growth of the resident set (VmHWM) during two steps over the state
after building the layer.

Variants: ``moe`` (moekit, dropless), ``moe_cf1.25`` (moekit with capacity factor 1.25), ``dense`` (hidden
k * d_ff: the same active FLOPs), ``einsum`` (GShard/Switch one-hot dispatch at CF 1.25), ``loop`` (HF Mixtral
per-expert loop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moekit.atomic import atomic_write_text
from moekit.errors import ConfigError
from moekit.lab.bench.peers import EinsumMoE, LoopMoE
from moekit.layers import DenseFFN, MoE, MoEConfig

VARIANTS = ("moe", "moe_cf1.25", "dense", "einsum", "loop")


@dataclass
class Case:
    num_experts: int
    top_k: int
    tokens: int = 4096
    d_model: int = 512
    d_ff: int = 2048
    activation: str = "gelu"
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)

    def median_ms(self, v: str) -> float:
        return statistics.median(self.times_ms[v])


def build_variant(name: str, case: Case, seed: int = 0) -> nn.Module:
    """All variants share the router and expert weights of one seeded moekit layer."""
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=case.d_model, d_ff=case.d_ff, num_experts=case.num_experts, top_k=case.top_k,
        capacity_factor=None, activation=case.activation,
    )
    moe = MoE(cfg)
    if name == "moe":
        return moe
    if name == "moe_cf1.25":
        capped = MoE(MoEConfig(**{**asdict(cfg), "capacity_factor": 1.25}))
        capped.load_state_dict(moe.state_dict())
        return capped
    if name == "dense":
        return DenseFFN(case.d_model, case.top_k * case.d_ff, case.activation)
    if name == "einsum":
        return EinsumMoE(moe, capacity_factor=1.25)
    if name == "loop":
        return LoopMoE(moe)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad)


GRAD_POLICIES = ("none", "reuse")
_SET_TO_NONE = {"value": True}


def _zero(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=_SET_TO_NONE["value"])
    x.grad = None


def make_inputs(case: Case, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.d_model, generator=g).requires_grad_(True)
    grad = torch.randn(case.tokens, case.d_model, generator=g)
    return x, grad


def time_case(case: Case, variants: tuple[str, ...], rounds: int) -> None:
    x, grad = make_inputs(case)
    modules = {v: build_variant(v, case) for v in variants}
    for v in variants:  # warm-up: allocate gradient buffers and caches
        for _ in range(2):
            _zero(modules[v], x)
            _step(modules[v], x, grad)
    case.times_ms = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            _zero(modules[v], x)
            t0 = time.perf_counter()
            _step(modules[v], x, grad)
            case.times_ms[v].append((time.perf_counter() - t0) * 1e3)


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def peak_memory_child(variant: str, case_json: str, set_to_none: bool = True) -> None:
    """Run in a fresh process: print the peak resident-set growth (MB) of two forward+backward steps."""
    _SET_TO_NONE["value"] = set_to_none
    case = Case(**json.loads(case_json))
    x, grad = make_inputs(case)
    module = build_variant(variant, case)
    # Building (weight init, cloning peers' weights) has its own peak: reset the high-water mark so that only the
    # steps are measured ("5" to clear_refs resets VmHWM to the current RSS, Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base_kb = _rss_kb("VmRSS")
    for _ in range(2):
        _zero(module, x)
        _step(module, x, grad)
    print(json.dumps({"peak_mb": (_rss_kb("VmHWM") - base_kb) / 1024}))


def measure_peak(variant: str, case: Case, threads: int, tuned: bool) -> float:
    if not Path("/proc/self/status").exists():
        return float("nan")
    spec = {k: getattr(case, k) for k in ("num_experts", "top_k", "tokens", "d_model", "d_ff", "activation")}
    code = (
        f"import torch; torch.set_num_threads({threads}); from moekit.lab.bench.layer import peak_memory_child; "
        f"from moekit.lab.runtime import tune_malloc; {'tune_malloc(); ' if tuned else ''}"
        f"peak_memory_child({variant!r}, {json.dumps(json.dumps(spec))}, {_SET_TO_NONE['value']})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def check_agreement(case: Case) -> float:
    """Max |moe - loop| on a forward pass: the peers must compute the same function before we time them."""
    x, _ = make_inputs(case)
    with torch.no_grad():
        a = build_variant("moe", case)(x)[0]
        b = build_variant("loop", case)(x)
    return float((a - b).abs().max())


def render_markdown(cases: list[Case], meta: dict) -> str:
    lines = [
        "# MoE layer throughput (forward + backward)",
        "",
        f"{meta['tokens']} tokens, d_model {meta['d_model']}, d_ff {meta['d_ff']}, {meta['activation']}, float32, "
        f"{meta['threads']} threads, torch {meta['torch']}, {meta['rounds']} interleaved rounds (median), "
        f"glibc malloc {'tuned (moekit.lab.runtime.tune_malloc)' if meta['malloc_tuned'] else 'defaults'}, "
        f"gradients reset with set_to_none={meta['grad_policy'] == 'none'}. "
        f"Command: `{meta['command']}`. Measured {meta['date']} on {meta['machine']}.",
        "",
        "Ratios are to the dense FFN with the same active FLOPs (hidden = k * d_ff), measured in the same run.",
        "",
        "| E | k | moe ms | moe CF1.25 ms | dense ms | einsum ms | loop ms | moe/dense | moe CF1.25/dense "
        "| loop/moe | einsum/moe | peak MB moe | peak MB loop | peak MB einsum | peak MB dense | moe/loop mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        m = {v: c.median_ms(v) for v in c.times_ms}
        p = c.peak_mb
        lines.append(
            f"| {c.num_experts} | {c.top_k} | {m['moe']:.1f} | {m['moe_cf1.25']:.1f} | {m['dense']:.1f} | "
            f"{m['einsum']:.1f} | {m['loop']:.1f} | {m['moe'] / m['dense']:.2f} | {m['moe_cf1.25'] / m['dense']:.2f} | "
            f"{m['loop'] / m['moe']:.2f} | {m['einsum'] / m['moe']:.2f} | {p.get('moe', float('nan')):.0f} | "
            f"{p.get('loop', float('nan')):.0f} | {p.get('einsum', float('nan')):.0f} | "
            f"{p.get('dense', float('nan')):.0f} | {p.get('moe', float('nan')) / p.get('loop', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_benchmark(
    experts: list[int], top_ks: list[int], tokens: int, d_model: int, d_ff: int, rounds: int, threads: int,
    out_dir: Path | None, command: str, measure_memory: bool = True, tuned: bool = False,
) -> list[Case]:
    """Time every (E, k) case; ``threads`` is the thread count the caller set (``moekit bench`` sets it: this
    function changes no process-wide setting), recorded in the results and used by the memory subprocesses;
    ``tuned``: whether the caller tuned glibc's malloc (recorded)."""
    if threads != torch.get_num_threads():
        raise ValueError(
            f"run_benchmark(threads={threads}) but torch runs {torch.get_num_threads()} threads: call "
            f"torch.set_num_threads({threads}) first"
        )
    cases: list[Case] = []
    for E in experts:
        for k in top_ks:
            if k > E:
                raise ConfigError(f"top_k={k} must be <= num_experts={E}")
            case = Case(num_experts=E, top_k=k, tokens=tokens, d_model=d_model, d_ff=d_ff)
            err = check_agreement(case)
            if err > 1e-3:
                raise RuntimeError(f"peer formulations disagree with moekit (max abs diff {err:.2e})")
            time_case(case, VARIANTS, rounds)
            if measure_memory:
                # glibc defaults in the memory child: a tuned allocator keeps freed pages resident, so the
                # resident set would no longer show what a step allocates.
                case.peak_mb = {v: measure_peak(v, case, threads, tuned=False) for v in VARIANTS}
            m = {v: case.median_ms(v) for v in VARIANTS}
            print(
                f"E={E:3d} k={k}  moe {m['moe']:8.1f} ms  dense {m['dense']:8.1f}  einsum {m['einsum']:8.1f}  "
                f"loop {m['loop']:8.1f}  | moe/dense {m['moe'] / m['dense']:.2f}  loop/moe {m['loop'] / m['moe']:.2f}"
                f"  einsum/moe {m['einsum'] / m['moe']:.2f}",
                flush=True,
            )
            cases.append(case)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "tokens": tokens, "d_model": d_model, "d_ff": d_ff, "activation": "gelu", "threads": threads,
            "rounds": rounds, "torch": torch.__version__, "command": command,
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "malloc_tuned": tuned, "grad_policy": "none" if _SET_TO_NONE["value"] else "reuse",
        }
        data = {"meta": meta, "cases": [asdict(c) for c in cases]}
        atomic_write_text(out_dir / "layer_throughput.json", json.dumps(data, indent=1))
        atomic_write_text(out_dir / "layer_throughput.md", render_markdown(cases, meta))
        print(f"results written to {out_dir}/layer_throughput.md")
    return cases


def main_from_args(args: argparse.Namespace) -> int:
    if args.quick:
        experts, top_ks, tokens, d_model, d_ff, rounds = [4], [1, 2], 256, 64, 128, 3
    else:
        experts, top_ks, tokens, d_model, d_ff, rounds = (
            args.experts, args.top_k, args.tokens, args.d_model, args.d_ff, args.rounds
        )
    for name, v in (("tokens", tokens), ("d-model", d_model), ("d-ff", d_ff), ("rounds", rounds),
                    ("threads", args.threads)):
        if v < 1:
            raise ConfigError(f"--{name} must be >= 1, got {v}")
    _SET_TO_NONE["value"] = args.grad_policy == "none"
    tuned = bool(getattr(args, "malloc_tuned", False))  # moekit.lab.cli.main applied it (or not)
    out = Path(args.out) if args.out else (None if args.quick else Path("benchmarks/results"))
    command = "moekit bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv)
    run_benchmark(experts, top_ks, tokens, d_model, d_ff, rounds, args.threads, out, command,
                  measure_memory=not args.quick, tuned=tuned)
    return 0
