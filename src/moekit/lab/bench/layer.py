"""Layer throughput benchmark: moekit's MoE layer against a FLOP-matched dense FFN, two peer formulations and
Hugging Face transformers' Mixtral block.

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
per-expert loop, written here), ``hf_eager`` and ``hf_grouped`` (transformers' ``MixtralSparseMoeBlock`` itself with
its "eager" and "grouped_mm" experts implementations; gated activations only, skipped with a note when transformers
is not importable). Every peer holds the moekit layer's weights and is checked equal to it before timing.

Allocator: glibc's malloc tuning (``moekit.lab.runtime.tune_malloc``) is process-wide and cannot be undone, so
:func:`run_allocators` times each setting ("default", "tuned") in fresh child processes, one per case (activation,
E, k), so that no case inherits another's heap; :func:`run_benchmark` times in the calling process and records the
setting the caller says it has.

Output: ``moekit bench`` writes ``layer_throughput.{md,json}`` into a new folder ``runs/bench-<UTC time>/`` under
the current directory unless ``--out`` names one; it never writes into ``benchmarks/results`` by itself.
"""

from __future__ import annotations

import argparse
import itertools
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
from moekit.lab.bench.peers import EinsumMoE, HFMixtral, LoopMoE, hf_unavailable
from moekit.layers import DenseFFN, MoE, MoEConfig

VARIANTS = ("moe", "moe_cf1.25", "dense", "einsum", "loop", "hf_eager", "hf_grouped")
HF_VARIANTS = {"hf_eager": "eager", "hf_grouped": "grouped_mm"}
ALLOCATORS = ("default", "tuned")


@dataclass
class Case:
    num_experts: int
    top_k: int
    tokens: int = 4096
    d_model: int = 512
    d_ff: int = 2048
    activation: str = "gelu"
    malloc: str = "default"
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    def median_ms(self, v: str) -> float:
        return statistics.median(self.times_ms[v])

    def spec(self) -> dict:
        """The sizes that define the case (what a child process needs to rebuild it)."""
        return {k: getattr(self, k) for k in ("num_experts", "top_k", "tokens", "d_model", "d_ff", "activation")}


def case_variants(activation: str, requested: tuple[str, ...] = VARIANTS) -> tuple[tuple[str, ...], str | None]:
    """The requested variants that can run for this activation, and a one-line note on any left out."""
    why = hf_unavailable(activation)
    if why is None or not any(v in HF_VARIANTS for v in requested):
        return tuple(requested), None
    return tuple(v for v in requested if v not in HF_VARIANTS), f"transformers peers skipped: {why}"


def build_variant(name: str, case: Case, seed: int = 0) -> nn.Module:
    """All variants share the router and expert weights of one seeded moekit layer (gates renormalised over the k
    choices, as Mixtral's block does, so top-1 gates are 1 everywhere)."""
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=case.d_model, d_ff=case.d_ff, num_experts=case.num_experts, top_k=case.top_k,
        capacity_factor=None, activation=case.activation, normalize_gates=True,
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
    if name in HF_VARIANTS:
        return HFMixtral(moe, HF_VARIANTS[name])
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


# How a step is timed: "wall" (time.perf_counter), or "cpu" (time.process_time: the CPU time this process used,
# kernel time for page faults included). With one thread it leaves out the time the step waited for a core while
# other jobs ran, though not what they cost it in shared caches and memory bandwidth; with more threads it would
# also count the threads' busy-waiting, so "cpu" needs --threads 1.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_case(case: Case, variants: tuple[str, ...], rounds: int, warmup: int = 2, clock: str = "wall") -> None:
    """``rounds`` interleaved timed steps of every variant after ``warmup`` untimed ones each (first-touch page
    faults, caches, lazy initialisation: a cold first step is not what a training loop sees), by ``clock``
    (:data:`CLOCKS`)."""
    now = CLOCKS[clock]
    x, grad = make_inputs(case)
    modules = {v: build_variant(v, case) for v in variants}
    for v in variants:
        for _ in range(warmup):
            _zero(modules[v], x)
            _step(modules[v], x, grad)
    case.times_ms = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            _zero(modules[v], x)
            t0 = now()
            _step(modules[v], x, grad)
            case.times_ms[v].append((now() - t0) * 1e3)


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
    spec = case.spec()
    code = (
        f"import torch; torch.set_num_threads({threads}); from moekit.lab.bench.layer import peak_memory_child; "
        f"from moekit.lab.runtime import tune_malloc; {'tune_malloc(); ' if tuned else ''}"
        f"peak_memory_child({variant!r}, {json.dumps(json.dumps(spec))}, {_SET_TO_NONE['value']})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def check_agreement(case: Case, variants: tuple[str, ...]) -> dict[str, float]:
    """Max |peer - moe| of a forward pass for every dropless peer (``loop`` and the transformers blocks): each must
    compute moekit's function on the same weights before it is timed. Raises when one differs by more than float32
    rounding (1e-4 of the output's scale)."""
    x, _ = make_inputs(case)
    diffs = {}
    with torch.no_grad():
        ref = build_variant("moe", case)(x)[0]
        scale = float(ref.abs().max())
        for v in variants:
            if v == "loop" or v in HF_VARIANTS:
                diffs[v] = float((build_variant(v, case)(x) - ref).abs().max())
                if not diffs[v] <= 1e-4 * scale + 1e-7:
                    raise RuntimeError(f"{v} disagrees with moekit (max abs diff {diffs[v]:.2e}, output scale "
                                       f"{scale:.2e})")
    return diffs


_LABELS = {"moe": "moe", "dense": "dense", "hf_grouped": "HF grouped_mm", "hf_eager": "HF eager", "loop": "loop",
           "einsum": "einsum", "moe_cf1.25": "moe CF1.25"}
_COLUMNS = ("moe", "dense", "hf_grouped", "hf_eager", "loop", "einsum", "moe_cf1.25")
_MALLOC = {"default": "glibc defaults", "tuned": "tuned (tune_malloc)"}


def _fmt_time(case: Case, v: str) -> str:
    if v not in case.times_ms:
        return "-"
    t = case.times_ms[v]
    return f"{statistics.median(t):.1f} ({min(t):.0f}-{max(t):.0f})"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}"


def best_hf(case: Case) -> float | None:
    """The median of the faster transformers backend, or None when none ran."""
    meds = [case.median_ms(v) for v in HF_VARIANTS if v in case.times_ms]
    return min(meds) if meds else None


# How the cases shared processes; results written before "process_per" existed ran one process per allocator.
_PROCESS_NOTE = {
    "case": "Each case (allocator setting, activation, E, k) ran in its own fresh process. ",
    "allocator": "Each allocator setting ran in its own fresh process. ",
    "caller": "Every case ran in the calling process, one after another. ",
}


def render_markdown(cases: list[Case], meta: dict) -> str:
    """Time table (median and min-max over rounds, ms) per allocator setting, then peak memory."""
    lines = [
        "# MoE layer throughput (forward + backward)",
        "",
        f"{meta['tokens']} tokens, d_model {meta['d_model']}, d_ff {meta['d_ff']}, float32, {meta['threads']} "
        f"threads, torch {meta['torch']}, transformers {meta['transformers']}, {meta['warmup']} warm-up steps then "
        f"{meta['rounds']} interleaved rounds per case, gradients reset with "
        f"set_to_none={meta['grad_policy'] == 'none'}. "
        + _PROCESS_NOTE[meta.get("process_per", "allocator")]
        + f"Command: `{meta['command']}`. Measured {meta['date']} "
        f"on {meta['machine']}.",
        "",
    ]
    if meta.get("slow_max_experts") is not None:
        lines += [f"The peers whose cost grows with E ({', '.join(SLOW_PEERS)}) ran up to E = "
                  f"{meta['slow_max_experts']} only (`--slow-peers-max-experts`): '-' marks what was not run.", ""]
    if meta.get("quick"):
        lines += ["**Quick run: a smoke test.** Sizes this small are dominated by per-call overheads; the ratios say "
                  "nothing about real layer sizes.", ""]
    lines += [
        ("Times are CPU milliseconds (`--clock cpu`: the process's CPU time, one thread; time spent waiting for a "
         "core is left out, contention for caches and memory bandwidth is not) " if meta.get("clock") == "cpu"
         else "Times are wall-clock milliseconds ")
        + "per forward + backward step: median (min-max) over the rounds. `dense` is the FFN "
        "with the same active FLOPs (hidden k * d_ff); `HF` is transformers' `MixtralSparseMoeBlock` with its "
        "experts implementation, built from moekit's weights and checked equal to moekit's output; `geglu` is "
        "the gated GELU that Mixtral's block computes with `hidden_act=\"gelu\"`. best HF / moe > 1 means moekit "
        "is faster.",
        "",
        "| allocator | act | E | k | " + " | ".join(f"{_LABELS[v]} ms" for v in _COLUMNS)
        + " | moe/dense | best HF / moe |",
        "|" + "---|" * (6 + len(_COLUMNS)),
    ]
    for c in cases:
        moe = c.median_ms("moe") if "moe" in c.times_ms else None
        dense = c.median_ms("dense") if "dense" in c.times_ms else None
        lines.append(
            f"| {_MALLOC.get(c.malloc, c.malloc)} | {c.activation} | {c.num_experts} | {c.top_k} | "
            + " | ".join(_fmt_time(c, v) for v in _COLUMNS)
            + f" | {_ratio(moe, dense)} | {_ratio(best_hf(c), moe)} |"
        )
    with_mem = [c for c in cases if c.peak_mb]
    if with_mem:
        lines += [
            "",
            "Peak memory: growth of the resident set (VmHWM, MB) over two steps, each variant in a fresh process with "
            "glibc's defaults (a tuned allocator keeps freed pages resident, which would hide what a step allocates).",
            "",
            "| act | E | k | " + " | ".join(f"{_LABELS[v]} MB" for v in _COLUMNS) + " | moe / best HF |",
            "|" + "---|" * (4 + len(_COLUMNS)),
        ]
        seen = set()
        for c in with_mem:
            key = (c.activation, c.num_experts, c.top_k)
            if key in seen:
                continue
            seen.add(key)
            p = c.peak_mb
            hf = [p[v] for v in HF_VARIANTS if v in p]
            lines.append(
                f"| {c.activation} | {c.num_experts} | {c.top_k} | "
                + " | ".join(f"{p[v]:.0f}" if v in p else "-" for v in _COLUMNS)
                + f" | {_ratio(p.get('moe'), min(hf) if hf else None)} |"
            )
    return "\n".join(lines) + "\n"


def _progress(case: Case, note: str | None) -> None:
    m = {v: case.median_ms(v) for v in case.times_ms}
    parts = "  ".join(f"{v} {m[v]:.1f}" for v in _COLUMNS if v in m)
    hf = best_hf(case)
    print(
        f"[{case.malloc}] {case.activation} E={case.num_experts} k={case.top_k} S={case.tokens} D={case.d_model} "
        f"F={case.d_ff}: median ms  {parts}  | moe/dense {m['moe'] / m['dense']:.2f}"
        + (f"  best HF/moe {hf / m['moe']:.2f}" if hf else "") + (f"  ({note})" if note else ""),
        file=sys.stderr, flush=True,
    )


# Peers whose cost grows with E (a Python loop over experts, one-hot [S, E, C] tensors): the ones a run may skip
# at large E to fit its time (``slow_max_experts``).
SLOW_PEERS = ("hf_eager", "loop", "einsum")


def time_cases(
    experts: list[int], top_ks: list[int], tokens: int, d_model: int, d_ff: int, rounds: int, *,
    activations: tuple[str, ...] = ("gelu",), variants: tuple[str, ...] = VARIANTS, warmup: int = 2,
    malloc: str = "default", slow_max_experts: int | None = None, clock: str = "wall",
) -> list[Case]:
    """Check and time every (activation, E, k) case in this process; ``malloc`` records the allocator setting the
    caller applied. Variants that cannot run for an activation are left out with a note on stderr, and so are the
    :data:`SLOW_PEERS` above ``slow_max_experts`` experts."""
    cases: list[Case] = []
    for act in activations:
        act_vars, note = case_variants(act, variants)
        for E in experts:
            run_vars = act_vars
            if slow_max_experts is not None and E > slow_max_experts:
                run_vars = tuple(v for v in act_vars if v not in SLOW_PEERS)
            for k in top_ks:
                if k > E:
                    raise ConfigError(f"top_k={k} must be <= num_experts={E}")
                case = Case(num_experts=E, top_k=k, tokens=tokens, d_model=d_model, d_ff=d_ff, activation=act,
                            malloc=malloc)
                case.max_abs_diff = check_agreement(case, run_vars)
                time_case(case, run_vars, rounds, warmup, clock)
                _progress(case, note)
                cases.append(case)
    return cases


def timing_child(spec_json: str, malloc: str) -> None:
    """Entry of a child process of :func:`run_allocators` (the caller applied ``malloc``): print the cases as
    JSON on the last line of stdout."""
    spec = json.loads(spec_json)
    _SET_TO_NONE["value"] = spec.pop("set_to_none")
    spec["activations"], spec["variants"] = tuple(spec["activations"]), tuple(spec["variants"])
    cases = time_cases(**spec, malloc=malloc)
    print(json.dumps([asdict(c) for c in cases]))


def run_allocators(
    experts: list[int], top_ks: list[int], tokens: int, d_model: int, d_ff: int, rounds: int, threads: int, *,
    allocators: tuple[str, ...] = ALLOCATORS, activations: tuple[str, ...] = ("swiglu",),
    variants: tuple[str, ...] = VARIANTS, warmup: int = 2, slow_max_experts: int | None = None, clock: str = "wall",
) -> list[Case]:
    """:func:`time_cases` for every (allocator setting, activation, E, k), each in a fresh child process with
    ``threads`` threads: glibc's tuning cannot be undone in a process, and with it tuned the heap never shrinks, so
    in a shared process one case's freed blocks would serve the next case's allocations. Progress goes to stderr."""
    for malloc in allocators:
        if malloc not in ALLOCATORS:
            raise ConfigError(f"allocator must be one of {ALLOCATORS}, got {malloc!r}")
    for E in experts:  # every user error before the first (minutes-long) child starts
        for k in top_ks:
            if k > E:
                raise ConfigError(f"top_k={k} must be <= num_experts={E}")
    cases: list[Case] = []
    for malloc in allocators:
        tune = (
            "from moekit.lab.runtime import tune_malloc; "
            "assert tune_malloc(), 'tune_malloc() could not tune this libc'; " if malloc == "tuned" else ""
        )
        for act, E, k in itertools.product(activations, experts, top_ks):
            spec = {"experts": [E], "top_ks": [k], "tokens": tokens, "d_model": d_model, "d_ff": d_ff,
                    "rounds": rounds, "activations": [act], "variants": list(variants), "warmup": warmup,
                    "slow_max_experts": slow_max_experts, "clock": clock, "set_to_none": _SET_TO_NONE["value"]}
            code = (
                f"import torch; torch.set_num_threads({threads}); {tune}"
                f"from moekit.lab.bench.layer import timing_child; "
                f"timing_child({json.dumps(json.dumps(spec))}, {malloc!r})"
            )
            out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
            cases += [Case(**c) for c in json.loads(out.stdout.strip().splitlines()[-1])]
    return cases


def write_results(cases: list[Case], out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "cases": [asdict(c) for c in cases]}
    atomic_write_text(out_dir / "layer_throughput.json", json.dumps(data, indent=1))
    atomic_write_text(out_dir / "layer_throughput.md", render_markdown(cases, meta))


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def command_line(argv: list[str]) -> str:
    """How the results say they were made: ``moekit bench ...`` from the command line, ``python <script> ...`` from a
    benchmark script (whose ``sys.argv[0]`` is the script's path)."""
    if argv[1:2] == ["bench"]:
        return "moekit bench " + " ".join(argv[2:])
    return " ".join(["python", *argv] if argv[0].endswith(".py") else argv)


def script_meta(script: str, argv: list[str] | None) -> dict:
    """What a benchmark script records about its run: versions, machine, UTC time and the command line."""
    return {"torch": torch.__version__, "transformers": _transformers_version(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command_line([f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])}


def _meta(cases: list[Case], tokens: int, d_model: int, d_ff: int, threads: int, rounds: int, warmup: int,
          command: str, quick: bool = False, slow_max_experts: int | None = None, clock: str = "wall",
          process_per: str = "case") -> dict:
    tf_version = _transformers_version() or "not installed"
    return {
        "tokens": tokens, "d_model": d_model, "d_ff": d_ff, "activations": sorted({c.activation for c in cases}),
        "allocators": sorted({c.malloc for c in cases}), "threads": threads, "rounds": rounds, "warmup": warmup,
        "torch": torch.__version__, "transformers": tf_version, "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "quick": quick,
        "grad_policy": "none" if _SET_TO_NONE["value"] else "reuse", "slow_max_experts": slow_max_experts,
        "clock": clock, "process_per": process_per,
    }


def run_benchmark(
    experts: list[int], top_ks: list[int], tokens: int, d_model: int, d_ff: int, rounds: int, threads: int,
    out_dir: Path | None, command: str, measure_memory: bool = True, tuned: bool = False, *,
    activations: tuple[str, ...] = ("gelu",), variants: tuple[str, ...] = VARIANTS, warmup: int = 2,
) -> list[Case]:
    """Time every (activation, E, k) case in this process; ``threads`` is the thread count the caller set (this
    function changes no process-wide setting), recorded in the results and used by the memory subprocesses;
    ``tuned``: whether the caller tuned glibc's malloc (recorded). Writes the results into ``out_dir`` if given."""
    if threads != torch.get_num_threads():
        raise ValueError(
            f"run_benchmark(threads={threads}) but torch runs {torch.get_num_threads()} threads: call "
            f"torch.set_num_threads({threads}) first"
        )
    cases = time_cases(experts, top_ks, tokens, d_model, d_ff, rounds, activations=activations, variants=variants,
                       warmup=warmup, malloc="tuned" if tuned else "default")
    if measure_memory:
        add_peak_memory(cases, threads)
    if out_dir is not None:
        write_results(cases, out_dir, _meta(cases, tokens, d_model, d_ff, threads, rounds, warmup, command,
                                              process_per="caller"))
        print(f"results written to {out_dir}/layer_throughput.md")
    return cases


def add_peak_memory(cases: list[Case], threads: int) -> None:
    """Peak memory of every timed variant, once per (activation, E, k), each in a fresh process with glibc's
    defaults; cases that differ only in allocator share the figures."""
    done: dict[tuple, dict[str, float]] = {}
    for c in cases:
        key = tuple(c.spec().values())
        if key not in done:
            done[key] = {v: measure_peak(v, c, threads, tuned=False) for v in c.times_ms}
        c.peak_mb = dict(done[key])


def new_run_dir(base: Path = Path("runs")) -> Path:
    """A folder that did not exist: ``runs/bench-<UTC time>`` (with a suffix if that name is taken)."""
    stem = "bench-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in range(1000):
        path = base / (stem if i == 0 else f"{stem}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"no free run folder name under {base}")


QUICK = {"experts": [4], "top_ks": [1, 2], "tokens": 512, "d_model": 64, "d_ff": 128, "rounds": 5, "warmup": 3,
         "activations": ["swiglu"]}


def main_from_args(args: argparse.Namespace) -> int:
    if args.quick:
        q = QUICK
        experts, top_ks, tokens, d_model, d_ff = q["experts"], q["top_ks"], q["tokens"], q["d_model"], q["d_ff"]
        rounds, warmup, activations = q["rounds"], q["warmup"], q["activations"]
        print("moekit bench --quick: a smoke test on tiny sizes (per-call overheads dominate); ratios here say "
              "nothing about real layers. Run without --quick to measure.", flush=True)
    else:
        experts, top_ks, tokens, d_model, d_ff, rounds, warmup = (
            args.experts, args.top_k, args.tokens, args.d_model, args.d_ff, args.rounds, args.warmup
        )
        activations = args.activations
    for name, v in (("tokens", tokens), ("d-model", d_model), ("d-ff", d_ff), ("rounds", rounds),
                    ("threads", args.threads)):
        if v < 1:
            raise ConfigError(f"--{name} must be >= 1, got {v}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "moe" not in args.variants or "dense" not in args.variants:
        raise ConfigError("--variants must include moe and dense (the ratios are to them)")
    if args.clock == "cpu" and args.threads != 1:
        raise ConfigError(f"--clock cpu needs --threads 1 (CPU time of several threads counts their busy-waiting), "
                          f"got --threads {args.threads}")
    _SET_TO_NONE["value"] = args.grad_policy == "none"
    out = Path(args.out) if args.out else new_run_dir()
    command = command_line(sys.argv)
    print(f"sizes: {tokens} tokens, d_model {d_model}, d_ff {d_ff}, E {experts}, k {top_ks}, activations "
          f"{activations}, allocators {args.allocators}, {args.threads} threads; times in ms per forward + "
          f"backward step, {warmup} warm-up steps, then median (min-max) of {rounds} interleaved rounds",
          flush=True)
    cases = run_allocators(experts, top_ks, tokens, d_model, d_ff, rounds, args.threads,
                           allocators=tuple(args.allocators), activations=tuple(activations),
                           variants=tuple(args.variants), warmup=warmup, slow_max_experts=args.slow_max_experts,
                           clock=args.clock)
    if not args.quick and args.memory:
        add_peak_memory(cases, args.threads)
    write_results(cases, out, _meta(cases, tokens, d_model, d_ff, args.threads, rounds, warmup, command,
                                    quick=args.quick, slow_max_experts=args.slow_max_experts, clock=args.clock))
    print(f"results written to {out}/layer_throughput.md")
    return 0
