"""Scale-out of training on a ``("dp", "ep")`` mesh: a measured weak-scaling benchmark here, and the scale model of
docs/SCALING.md.

**Measured (default).** Trains a small MoE LM (d_model 128, 4 blocks, every other FFN an MoE of 8 experts, top-2,
dropless) for a few steps at the layouts (dp, ep) = (1,1), (2,1), (1,2), (4,1), (2,2), (1,4), then (2,1), (4,1),
(2,2), (1,4) with the non-expert weights FSDP2-sharded, with a FIXED batch per process (weak scaling), on gloo ranks
started by ``torch.multiprocessing.spawn``, one torch thread each. The step is driven here with the library's pieces
so each part can be timed: ``init_parallel_mesh`` / ``ExpertParallel.from_mesh``, the model's forward on this rank's
rows (``local_rows``), backward of loss / world, ``sync_gradients``, ``clip_gradients``, ``optimizer.step``
(``build_optimizer``, AdamW). (1,1) is the one-process step (no process group; ``clip_grad_norm_``), also in a
spawned process. Inside the benchmark processes only, ``torch.distributed.all_to_all_single``, ``all_reduce`` and
FSDP's ``all_gather_single`` / ``reduce_scatter_single`` are wrapped (monkeypatched) to sum the time spent in them
and the bytes they are handed; the library is untouched. Per step it records compute (forward + backward minus the
time inside all-to-all), all-to-all, gradient sync, clip, optimizer step and the rest (zeroing, the closing barrier:
waiting for the slowest rank). Warm-up steps are dropped; medians and IQRs over steps. Every layout runs once per
round; ratios are against (1,1) of the same invocation. The bytes counted in the wrappers must equal the scale
model's formulas (:func:`collective_bytes`) for this config: the run fails otherwise.

**Model (``--model``).** Prints the tables of docs/SCALING.md: step time and memory per GPU for a 0.95 B-active /
16.6 B-total moekit MoE on 8 to 1,024 H100-class GPUs (assumptions in :data:`HW` and :func:`big_config`). No
processes, no measurement.

Why: issue 17 asks how far data x expert parallelism goes, and where the all-to-all starts to dominate; this
machine (2 cores, shared) can only check the byte counts and the mechanics, the scale model does the rest.

    nice -n 5 .venv/bin/python benchmarks/scale_out.py      # ~5-10 min; writes benchmarks/results/scale_out.{md,json}
    .venv/bin/python benchmarks/scale_out.py --model        # the SCALING.md tables, to stdout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_parallel import _free_port  # noqa: E402  (same port helper as the EP benchmark)
from moekit.layers.config import MoEConfig  # noqa: E402
from moekit.models import TransformerLM  # noqa: E402
from moekit.models.config import LMConfig  # noqa: E402
from moekit.models.flops import flops_per_token, parameter_counts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (dp, ep, fsdp): the replicated layouts, then the same meshes with the non-expert weights FSDP2-sharded.
LAYOUTS: tuple[tuple[int, int, bool], ...] = (
    (1, 1, False), (2, 1, False), (1, 2, False), (4, 1, False), (2, 2, False), (1, 4, False),
    (2, 1, True), (4, 1, True), (2, 2, True), (1, 4, True),
)
PHASES = ("compute", "all_to_all", "fsdp_comm", "grad_sync", "clip", "optimizer", "other")


def layout_key(dp: int, ep: int, fsdp: bool) -> str:
    return f"{dp}x{ep}" + ("+fsdp" if fsdp else "")


def layout_label(dp: int, ep: int, fsdp: bool) -> str:
    return f"({dp},{ep})" + (" FSDP" if fsdp else "")


# ---------------------------------------------------------------------------------------------------------------
# The byte formulas (shared by the measured check and the scale model)
def n_moe_layers(cfg: LMConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def fsdp_units(cfg: LMConfig) -> list[tuple[list[tuple[int, ...]], int]]:
    """FSDP's units as moekit cuts them (``ExpertParallel._apply_fsdp``): each block, then the model's remaining
    parameters (embedding, final norm); per unit the shapes of its non-expert parameters and how many times a step
    all-gathers it (a block twice: it is freed after the forward and gathered again for the backward; the root
    once: FSDP2 keeps the root's weights gathered until the backward)."""
    from moekit.training.distributed import fsdp_units as units_of

    with torch.device("meta"):
        model = TransformerLM(cfg)
    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    blocks = units_of(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    units = [([tuple(p.shape) for p in b.parameters() if id(p) not in experts], 2) for b in blocks]
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks]
    return [*units, (root, 1)]


def _padded(shape: tuple[int, ...], world: int) -> int:
    """Elements FSDP2 holds for a parameter of ``shape`` over ``world`` ranks: dim 0 padded to a multiple."""
    return math.ceil(shape[0] / world) * world * math.prod(shape[1:]) if shape else world


def collective_bytes(
    cfg: LMConfig, dp: int, ep: int, tokens_per_rank: int, act_bytes: int, grad_bytes: int, fsdp: bool = False,
    weight_bytes: int = 4,
) -> dict:
    """Bytes each rank hands to each collective in one training step (mean over ranks), by moekit's scheme.

    - all-to-all rows: per MoE layer 4 exchanges (forward dispatch and combine, their reverse in the backward), each
      ``tokens x k x d_model`` elements (dropless top-k; the block for the rank itself included). The mean over the
      ranks of an ``ep`` group is exact whatever the routing, since every row sent is received once.
    - all-to-all counts: one ``[ep, E/ep]`` int64 exchange per MoE layer in the forward.
    - gradient all-reduce: every non-expert gradient over all ranks, this rank's expert gradients over ``dp``.
    - clip: one float64 (the expert squares) over ``ep``.
    - with ``fsdp``: no all-reduce of the non-expert gradients; instead every unit of :func:`fsdp_units` all-gathers
      this rank's shard of its weights (``weight_bytes`` per element, dim 0 padded to a multiple of the world size)
      once or twice and reduce-scatters its whole padded gradient once; one more float64 all-reduce for the clip.
    """
    world = dp * ep
    counts = parameter_counts(cfg)
    expert = counts["expert"]
    replicated = counts["total"] - expert
    m = cfg.moe
    layers = n_moe_layers(cfg)
    return {
        "a2a_rows": layers * 4 * tokens_per_rank * m.top_k * cfg.d_model * act_bytes if ep > 1 else 0,
        "a2a_counts": layers * m.num_experts * 8 if ep > 1 else 0,
        "grad_world": replicated * grad_bytes if world > 1 and not fsdp else 0,
        "grad_dp": expert // ep * grad_bytes if dp > 1 else 0,
        "clip": (16 if fsdp else 8) if world > 1 else 0,
        "fsdp_allgather": sum(n * sum(_padded(s, world) for s in shapes) // world for shapes, n in fsdp_units(cfg))
        * weight_bytes if fsdp else 0,
        "fsdp_reducescatter": sum(_padded(s, world) for shapes, _ in fsdp_units(cfg) for s in shapes) * grad_bytes
        if fsdp else 0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Measured part
def tiny_config(args: argparse.Namespace) -> LMConfig:
    moe = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                    capacity_factor=None)
    return LMConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=4, d_ff=args.d_ff,
                    max_seq_len=args.seq_len, moe=moe, moe_every=2, moe_offset=1)


class _Meter:
    """Time and bytes inside the wrapped collectives of one process, by kind; ``phase`` tags the all-reduces."""

    def __init__(self) -> None:
        self.phase = "other"
        self.reset()

    def reset(self) -> None:
        self.s: dict[str, float] = {"a2a": 0.0, "allreduce": 0.0, "fsdp": 0.0}
        self.bytes: dict[str, int] = {"a2a_rows": 0, "a2a_rows_off_rank": 0, "a2a_counts": 0, "grad": 0,
                                      "clip": 0, "other": 0, "fsdp_allgather": 0, "fsdp_reducescatter": 0}

    def install(self) -> None:
        raw_a2a, raw_ar = dist.all_to_all_single, dist.all_reduce
        raw_ag, raw_rs = dist.all_gather_single, dist.reduce_scatter_single

        # FSDP2's collectives (torch 2.13 calls these two; synchronous on CPU, so the time inside is the exchange).
        def all_gather_single(output_tensor, input_tensor, *a, **kw):
            t = time.perf_counter()
            r = raw_ag(output_tensor, input_tensor, *a, **kw)
            self.s["fsdp"] += time.perf_counter() - t
            self.bytes["fsdp_allgather"] += input_tensor.numel() * input_tensor.element_size()
            return r

        def reduce_scatter_single(output, input, *a, **kw):
            t = time.perf_counter()
            r = raw_rs(output, input, *a, **kw)
            self.s["fsdp"] += time.perf_counter() - t
            self.bytes["fsdp_reducescatter"] += input.numel() * input.element_size()
            return r

        dist.all_gather_single = all_gather_single
        dist.reduce_scatter_single = reduce_scatter_single

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            t = time.perf_counter()
            r = raw_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)
            self.s["a2a"] += time.perf_counter() - t
            n = input.numel() * input.element_size()
            if input.dtype == torch.int64:  # the per-expert row counts
                self.bytes["a2a_counts"] += n
            else:
                self.bytes["a2a_rows"] += n
                me = dist.get_rank(group)
                row = n // max(1, input.shape[0]) if input.dim() else n
                own = input_split_sizes[me] * row if input_split_sizes else n // dist.get_world_size(group)
                self.bytes["a2a_rows_off_rank"] += n - own
            return r

        def all_reduce(tensor, *a, **kw):
            t = time.perf_counter()
            r = raw_ar(tensor, *a, **kw)
            self.s["allreduce"] += time.perf_counter() - t
            kind = self.phase if self.phase in ("grad", "clip") else "other"
            self.bytes[kind] += tensor.numel() * tensor.element_size()
            return r

        dist.all_to_all_single = all_to_all_single
        dist.all_reduce = all_reduce


def _worker(
    rank: int, world: int, dp: int, ep: int, fsdp: bool, args: argparse.Namespace, port: int, out_dir: str
) -> None:
    """Time ``args.warmup + args.steps`` training steps on this rank; write this rank's per-step figures."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from moekit.training.config import TrainConfig
    from moekit.training.distributed import ExpertParallel, init_parallel_mesh
    from moekit.training.optim import build_optimizer

    meter = _Meter()
    par = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        meter.install()
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(args))
    opt = build_optimizer(model, TrainConfig(lr=1e-3, grad_clip=1.0))
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        mesh = init_parallel_mesh(dp, ep, timeout_s=300)
        par = ExpertParallel.from_mesh(model, mesh, fsdp=fsdp)
        par.shard(opt)
        params = [p for p in model.parameters() if p.requires_grad]  # FSDP swapped in its DTensor shards
    gen = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, args.vocab, (args.batch_per_proc * world, args.seq_len + 1), generator=gen)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if par is not None:
            inputs, targets = par.local_rows(inputs), par.local_rows(targets)
            dist.barrier()  # start together: the step time is then the slowest rank's
        meter.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        meter.phase = "other"
        out = model(inputs, targets)
        if par is None:
            out.loss.backward()
        else:
            (out.loss / world).backward()  # this rank's share of the global mean
        t1 = time.perf_counter()
        a2a_s, fsdp_s = meter.s["a2a"], meter.s["fsdp"]
        if par is None:
            t2 = t1
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            meter.phase = "grad"
            par.sync_gradients(params)
            t2 = time.perf_counter()
            meter.phase = "clip"
            par.clip_gradients(params, 1.0)
            meter.phase = "other"
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        if par is not None:
            dist.barrier()
        t5, c5 = time.perf_counter(), time.process_time()
        if step >= args.warmup:
            rows.append({
                "step_s": t5 - t0, "cpu_s": c5 - c0,
                "compute": t1 - t0 - a2a_s - fsdp_s, "all_to_all": a2a_s, "fsdp_comm": fsdp_s,
                "grad_sync": t2 - t1, "clip": t3 - t2,
                "optimizer": t4 - t3, "other": t5 - t4,
                "tokens": inputs.numel(), "bytes": dict(meter.bytes),
            })
    # What this rank holds for training: weights, gradients and AdamW's state (its shards and slices only).
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    held = {
        "weights": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "adam": sum(nbytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rows": rows, "held_bytes": held}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    # As tests/distributed/_launch.py: skip interpreter finalisation, where gloo's threads have aborted finished
    # ranks under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def run_layout(args: argparse.Namespace, dp: int, ep: int, fsdp: bool) -> dict:
    """One layout: spawn dp x ep ranks (one process for (1,1)); per step the max over ranks of the step time and
    the mean over ranks of each phase; medians and quartiles over the steps."""
    world = dp * ep
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mp.spawn(_worker, args=(world, dp, ep, fsdp, args, _free_port(), tmp), nprocs=world, join=True)
        wall = time.perf_counter() - t
        reports = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    ranks = [rep["rows"] for rep in reports]
    held = {k: max(rep["held_bytes"][k] for rep in reports) for k in reports[0]["held_bytes"]}
    steps = len(ranks[0])
    step_s = [max(rk[i]["step_s"] for rk in ranks) for i in range(steps)]
    phases = {p: [statistics.fmean(rk[i][p] for rk in ranks) for i in range(steps)] for p in PHASES}
    cpu = [statistics.fmean(rk[i]["cpu_s"] for rk in ranks) for i in range(steps)]
    tokens = sum(rk[0]["tokens"] for rk in ranks)  # global tokens per step
    keys = ranks[0][0]["bytes"].keys()
    # Bytes summed over the ranks: the same every step (dropless), except how many rows leave their rank, which
    # follows the routing (reported as the mean over steps).
    per_step_sum = [{k: sum(rk[i]["bytes"][k] for rk in ranks) for k in keys} for i in range(steps)]
    fixed = [{k: v for k, v in b.items() if k != "a2a_rows_off_rank"} for b in per_step_sum]
    assert all(b == fixed[0] for b in fixed), f"bytes per step changed between steps: {per_step_sum}"
    bytes_sum = {**fixed[0], "a2a_rows_off_rank": statistics.fmean(b["a2a_rows_off_rank"] for b in per_step_sum)}
    q = _quartiles(step_s)
    return {
        "dp": dp, "ep": ep, "fsdp": fsdp, "world": world, "global_tokens_per_step": tokens, "wall_s": wall,
        "held_bytes_max_rank": held,
        "step_s": {"median": q[1], "q1": q[0], "q3": q[2]},
        "tokens_per_s": tokens / q[1],
        "cpu_s_per_rank": statistics.median(cpu),
        "phases": {p: dict(zip(("q1", "median", "q3"), _quartiles(v), strict=True)) for p, v in phases.items()},
        "bytes_sum_over_ranks": bytes_sum,
        "step_s_all": step_s,
    }


def check_bytes(cfg: LMConfig, r: dict, tokens_per_rank: int) -> dict:
    """The bytes the wrappers counted (sum over ranks) against ``world x`` the model's per-rank formula."""
    world = r["world"]
    model = collective_bytes(cfg, r["dp"], r["ep"], tokens_per_rank, act_bytes=4, grad_bytes=4, fsdp=r["fsdp"])
    got = r["bytes_sum_over_ranks"]
    pairs = {
        "a2a_rows": (got["a2a_rows"], world * model["a2a_rows"]),
        "a2a_counts": (got["a2a_counts"], world * model["a2a_counts"]),
        "grad_allreduce": (got["grad"], world * (model["grad_world"] + model["grad_dp"])),
        "clip_allreduce": (got["clip"], world * model["clip"]),
        "fsdp_allgather": (got["fsdp_allgather"], world * model["fsdp_allgather"]),
        "fsdp_reducescatter": (got["fsdp_reducescatter"], world * model["fsdp_reducescatter"]),
    }
    for name, (measured, expected) in pairs.items():
        label = layout_label(r["dp"], r["ep"], r["fsdp"])
        assert measured == expected, f"{label} {name}: counted {measured} bytes, model {expected}"
    ep = r["ep"]
    return {
        **{k: {"counted_sum_over_ranks": a, "model_sum_over_ranks": b} for k, (a, b) in pairs.items()},
        "a2a_off_rank_share": {
            "counted": got["a2a_rows_off_rank"] / got["a2a_rows"] if got["a2a_rows"] else 0.0,
            "model_uniform_routing": (ep - 1) / ep,
        },
    }


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def measure(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = tiny_config(args)
    start = {"load1": _load(), "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
             "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"nproc {start['nproc']}, 1-min load average at start {start['load1']:.2f}", flush=True)
    t_all = time.perf_counter()
    rounds: list[dict[str, dict]] = []
    for rnd in range(args.rounds):
        res = {}
        for dp, ep, fsdp in LAYOUTS:
            r = run_layout(args, dp, ep, fsdp)
            r["bytes_check"] = check_bytes(cfg, r, args.batch_per_proc * args.seq_len)
            res[layout_key(dp, ep, fsdp)] = r
            print(f"round {rnd + 1} {layout_label(dp, ep, fsdp)}: step {1e3 * r['step_s']['median']:.1f} ms, "
                  f"{r['tokens_per_s']:.0f} tokens/s, a2a {1e3 * r['phases']['all_to_all']['median']:.1f} ms, "
                  f"grad sync {1e3 * r['phases']['grad_sync']['median']:.1f} ms ({r['wall_s']:.0f} s wall)",
                  flush=True)
        rounds.append(res)
    end = {"load1": _load(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "total_wall_s": time.perf_counter() - t_all}
    print(f"1-min load average at end {end['load1']:.2f}; {end['total_wall_s']:.0f} s in all", flush=True)
    summary = summarise(rounds)
    counts = parameter_counts(cfg)
    cmd = "nice -n 5 .venv/bin/python benchmarks/scale_out.py" + ("".join(" " + a for a in argv) if argv else "")
    report = {
        "command": cmd, "machine": {**start, "end_load1": end["load1"], "end_time": end["time"],
                                    "total_wall_s": end["total_wall_s"], "torch": torch.__version__},
        "config": {**{k: getattr(args, k) for k in ("d_model", "d_ff", "layers", "experts", "top_k", "vocab",
                                                     "seq_len", "batch_per_proc", "steps", "warmup", "rounds")},
                   "moe_every": 2, "capacity_factor": None, "threads_per_process": 1, "precision": "float32",
                   "parameters_total": counts["total"], "parameters_expert": counts["expert"],
                   "train_flops_per_token": flops_per_token(cfg)["train"]},
        "summary": summary, "rounds": rounds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    Path(args.out).write_text(render_md(report))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def summarise(rounds: list[dict[str, dict]]) -> dict:
    """Per layout: throughput and step-time ratios against (1,1) of the same round (median over rounds and their
    range), the phases as shares of the step (all rounds' steps pooled)."""
    out = {}
    for key in rounds[0]:
        thr = [rd[key]["tokens_per_s"] / rd["1x1"]["tokens_per_s"] for rd in rounds]
        stp = [rd[key]["step_s"]["median"] / rd["1x1"]["step_s"]["median"] for rd in rounds]
        cpu = [rd[key]["cpu_s_per_rank"] / rd["1x1"]["cpu_s_per_rank"] for rd in rounds]
        steps = [s for rd in rounds for s in rd[key]["step_s_all"]]
        med_step = statistics.median(steps)
        phases = {p: statistics.median([rd[key]["phases"][p]["median"] for rd in rounds]) for p in PHASES}
        r0 = rounds[0][key]
        out[key] = {
            "dp": r0["dp"], "ep": r0["ep"], "fsdp": r0["fsdp"], "world": r0["world"],
            "held_mb_max_rank": sum(r0["held_bytes_max_rank"].values()) / 2**20,
            "throughput_ratio": statistics.median(thr), "throughput_ratio_per_round": thr,
            "step_time_ratio": statistics.median(stp), "step_time_ratio_per_round": stp,
            "step_ms_median_pooled": 1e3 * med_step,
            "phase_ms": {p: 1e3 * v for p, v in phases.items()},
            "phase_share": {p: v / sum(phases.values()) for p, v in phases.items()},
            "cpu_s_per_rank_per_step": statistics.median([rd[key]["cpu_s_per_rank"] for rd in rounds]),
            "cpu_per_rank_ratio": statistics.median(cpu),
        }
    return out


def render_md(rep: dict) -> str:
    c, m, s = rep["config"], rep["machine"], rep["summary"]
    per_proc = c["batch_per_proc"] * c["seq_len"]
    lines = [
        "# Scale-out on a (dp, ep) mesh: weak scaling on this machine",
        "",
        f"Command: `{rep['command']}` (started {m['time']}, {m['total_wall_s']:.0f} s in all)",
        "",
        f"Model: {c['layers']} blocks, d_model {c['d_model']}, d_ff {c['d_ff']}, every other FFN an MoE of "
        f"{c['experts']} experts top-{c['top_k']} (dropless), vocabulary {c['vocab']}; {c['parameters_total']:,} "
        f"parameters ({c['parameters_expert']:,} in experts), {c['train_flops_per_token'] / 1e6:.2f} M training "
        f"FLOPs / token. Weak scaling: {c['batch_per_proc']} x {c['seq_len']} = {per_proc} tokens per process per "
        f"step at every layout; float32, AdamW, clip 1.0; {c['warmup']} warm-up + {c['steps']} timed steps per "
        f"layout and round, {c['rounds']} rounds (each round runs every layout once, in the order below).",
        "",
        f"**Machine: {m['nproc']} cores ({m['affinity']} usable), shared with other jobs: 1-minute load average "
        f"{m['load1']:.2f} at the start and {m['end_load1']:.2f} at the end.** Every process has one torch thread, so "
        "2 processes fill the 2 cores and 4 processes oversubscribe them 2x (before counting the other jobs). The "
        "ideal weak-scaling throughput ratio is therefore min(world, cores) = 1, 2, 2, not 1, 2, 4; treat the "
        "absolute figures as indicative and the ratios as what this machine shows.",
        "",
        "## Throughput and step time, against (1,1) of the same round",
        "",
        "| (dp, ep) | processes | global tokens / step | throughput ratio (rounds) | step-time ratio (rounds) | "
        "step ms (median, all rounds) | CPU s / rank / step | CPU per rank vs (1,1) | weights + gradients + Adam "
        "held per rank (MiB, largest rank) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s.values():
        thr = ", ".join(f"{x:.2f}" for x in r["throughput_ratio_per_round"])
        stp = ", ".join(f"{x:.2f}" for x in r["step_time_ratio_per_round"])
        lines.append(
            f"| {layout_label(r['dp'], r['ep'], r['fsdp'])} | {r['world']} | {per_proc * r['world']} | "
            f"**{r['throughput_ratio']:.2f}x** ({thr}) | {r['step_time_ratio']:.2f} ({stp}) | "
            f"{r['step_ms_median_pooled']:.1f} | {r['cpu_s_per_rank_per_step']:.3f} | {r['cpu_per_rank_ratio']:.2f} | "
            f"{r['held_mb_max_rank']:.1f} |"
        )
    lines += [
        "",
        "Throughput = global tokens per step / median step time (the slowest rank's: every step starts and ends "
        "with a barrier). The headline ratio is the median over rounds of the per-round ratio. CPU s / rank / step is "
        "the process CPU time of a rank over the step (gloo's threads included; a rank blocked in a collective uses "
        "none): every rank handles the same tokens, so its ratio to (1,1) is the extra work per token that the "
        "layout costs, which the oversubscription does not inflate the way it inflates wall time. The memory column "
        "counts the tensors a rank holds after a step (its expert slices, its FSDP shards or replicas, their "
        "gradients and AdamW's two moments), measured, not modelled.",
        "",
        "## Where the step goes (median ms per step, mean over ranks; share of the step)",
        "",
        "| (dp, ep) | compute | all-to-all | FSDP all-gather + reduce-scatter | gradient all-reduce | clip | "
        "optimizer | other (zeroing, waiting at the closing barrier) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s.values():
        cells = [f"{r['phase_ms'][p]:.1f} ({100 * r['phase_share'][p]:.0f}%)" for p in PHASES]
        lines.append(f"| {layout_label(r['dp'], r['ep'], r['fsdp'])} | " + " | ".join(cells) + " |")
    first = rep["rounds"][0]
    lines += [
        "",
        "Compute is forward + backward minus the time inside `all_to_all_single` and FSDP's collectives "
        "(`all_gather_single` of each unit's weights before it runs, `reduce_scatter_single` of its gradients in "
        "the backward; both synchronous on CPU); the all-to-all time includes "
        "waiting for the other ranks of the `ep` group to reach the exchange (uneven expert loads, and here above "
        "all ranks descheduled on the oversubscribed cores), not only copying. The gradient all-reduce is "
        "`sync_gradients` (zero-filling, flattening, the all-reduces; under FSDP only the experts' over dp). "
        "Per-layout quartiles are in the JSON.",
        "",
        "## Bytes per step, counted in the wrappers = the scale model's formulas (asserted)",
        "",
        "Sums over all ranks of the bytes handed to each collective in one step; the run fails if any differs from "
        "`world x collective_bytes(...)` (docs/SCALING.md, float32 here: 4 bytes per element).",
        "",
        "| (dp, ep) | all-to-all rows | all-to-all counts | gradient all-reduce | clip all-reduce | FSDP all-gather | "
        "FSDP reduce-scatter | off-rank share of the rows: counted / uniform-routing model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in first.values():
        b = r["bytes_check"]
        lines.append(
            f"| {layout_label(r['dp'], r['ep'], r['fsdp'])} | {b['a2a_rows']['counted_sum_over_ranks']:,} | "
            f"{b['a2a_counts']['counted_sum_over_ranks']:,} | {b['grad_allreduce']['counted_sum_over_ranks']:,} | "
            f"{b['clip_allreduce']['counted_sum_over_ranks']:,} | {b['fsdp_allgather']['counted_sum_over_ranks']:,} | "
            f"{b['fsdp_reducescatter']['counted_sum_over_ranks']:,} | {b['a2a_off_rank_share']['counted']:.3f} / "
            f"{b['a2a_off_rank_share']['model_uniform_routing']:.3f} |"
        )
    lines += [
        "",
        "Every step counted the same bytes (checked), except the rows that leave their rank: that share follows the "
        "routing (mean over the timed steps of round 1 shown); the scale model assumes uniform routing.",
        "",
        "Not measured here: the loss / routing-metric all-reduces of `Trainer._train_step` (a few floats), "
        "checkpointing, data loading. FSDP gathers float32 weights here (moekit applies no mixed-precision policy: "
        "the router must stay float32), so its all-gather moves 4 bytes per element; the scale model's GPU rows "
        "assume bf16 weights gathered (docs/SCALING.md).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Scale model (docs/SCALING.md)
@dataclass(frozen=True)
class Hardware:
    flops: float = 400e12  # achieved bf16 FLOP/s on the compute part (40% of an H100 SXM's 989 TFLOP/s dense)
    peak_flops: float = 989e12
    nvlink: float = 450e9  # bytes/s per GPU per direction inside a node
    net: float = 50e9  # bytes/s per GPU per direction between nodes (400 Gb/s NIC per GPU)
    gpus_per_node: int = 8
    hbm: float = 0.8 * 3.35e12  # bytes/s the optimizer step streams at (80% of H100 SXM HBM3)
    memory: float = 80e9
    usable: float = 0.9  # share of the 80 GB budgeted (CUDA context, NCCL buffers, fragmentation take the rest)


HW = Hardware()
GLOBAL_SEQS, SEQ_LEN, MICRO_SEQS = 1024, 4096, 1


def big_config() -> LMConfig:
    """The modelled moekit MoE: 20 blocks, every FFN an MoE of 128 SwiGLU experts (d_ff 1024), top-4, d_model
    2048, 16 heads of 128, vocabulary 50,304 tied; 0.947 B active / 16.55 B total parameters."""
    moe = MoEConfig(d_model=2048, d_ff=1024, num_experts=128, top_k=4, capacity_factor=None, activation="swiglu")
    return LMConfig(vocab_size=50304, d_model=2048, n_layers=20, n_heads=16, d_ff=8192, max_seq_len=SEQ_LEN,
                    activation="swiglu", moe=moe, moe_every=1, moe_offset=0)


def act_bytes_per_token(cfg: LMConfig) -> float:
    """Activation bytes kept for the backward per token (no recomputation; flash attention, so no T^2 term).

    Per block: 20 D = the attention sub-block's 14 D (fp32 residual input 4 D, bf16 normed input 2 D, q, k, v 6 D,
    attention output 2 D) + the MoE sub-block's inputs 6 D (fp32 residual 4 D, bf16 normed 2 D); 4 E (fp32 router
    logits); 4 k D (bf16 rows into and out of the experts); 6 k F (SwiGLU gate, up and their product, bf16). Plus
    6 V for the logits (bf16) and their fp32 log-softmax. An estimate: norms' statistics, masks, the routing
    indices and allocator slack are left out."""
    m = cfg.moe
    per_block = 20 * cfg.d_model + 4 * m.num_experts + 4 * m.top_k * cfg.d_model + 6 * m.top_k * m.d_ff
    return cfg.n_layers * per_block + 6 * cfg.vocab_size


def _group_spread(size: int, stride: int, hw: Hardware = HW) -> tuple[int, int]:
    """(members per node, nodes) of a group of ``size`` ranks ``stride`` apart (ranks fill nodes in order)."""
    g = hw.gpus_per_node
    per_node = max(1, min(size, g // stride)) if stride < g else 1
    return per_node, math.ceil(size / per_node)


def allreduce_s(nbytes: float, per_node: int, nodes: int, kind: str = "allreduce", hw: Hardware = HW) -> float:
    """Bandwidth-only time of a hierarchical collective over ``per_node x nodes`` ranks (latency ignored): the
    NVLink phase moves (m-1)/m of the buffer, the network phase (n-1)/n of each GPU's 1/m share over its own NIC;
    an all-reduce is a reduce-scatter plus an all-gather (twice the traffic of either)."""
    twice = 2 if kind == "allreduce" else 1
    intra = twice * (per_node - 1) / per_node * nbytes / hw.nvlink
    inter = twice * (nodes - 1) / nodes * nbytes / per_node / hw.net if nodes > 1 else 0.0
    return intra + inter


def a2a_fractions(ep: int, hw: Hardware = HW) -> tuple[float, float]:
    """(inside the node, across nodes) shares of the rows a rank sends, with uniform routing over the ``ep`` ranks
    of its group (consecutive ranks: a group of ep <= 8 lies inside one node)."""
    local = min(ep, hw.gpus_per_node)
    return (local - 1) / ep, (ep - local) / ep


def model_layout(
    world: int, ep: int, sharding: str, *, hw: Hardware = HW, grad_bytes: int = 4, global_seqs: int = GLOBAL_SEQS
) -> dict:
    """Step time (s) and memory (bytes) per GPU of :func:`big_config` at ``world`` GPUs, layout (world/ep, ep).

    ``sharding``: "none" (non-expert weights replicated, gradients all-reduced once per step), "fsdp" (non-expert
    weights, gradients and Adam state sharded over all ranks: per micro-batch an all-gather of the bf16 weights in
    the forward and again in the backward, a reduce-scatter of the fp32 gradients), "fsdp_all" (the experts too,
    over the ``dp`` ranks holding the same shard). Compute, all-to-all and the collectives do not overlap.
    ``grad_bytes``: bytes per gradient element in the all-reduce (moekit: fp32); ``global_seqs``: sequences of
    ``SEQ_LEN`` tokens per step over all GPUs (micro-batches of ``MICRO_SEQS`` sequences, accumulated)."""
    cfg = big_config()
    dp = world // ep
    counts = parameter_counts(cfg)
    p_exp = counts["expert"]
    p_rep = counts["total"] - p_exp
    tokens = global_seqs * SEQ_LEN // world  # per GPU per step
    micro = tokens // (MICRO_SEQS * SEQ_LEN)  # micro-batches per step (gradient accumulation)
    compute = tokens * flops_per_token(cfg)["train"] / hw.flops
    b = collective_bytes(cfg, dp, ep, tokens, act_bytes=2, grad_bytes=grad_bytes)
    f_in, f_out = a2a_fractions(ep, hw)
    a2a = max(b["a2a_rows"] * f_in / hw.nvlink, b["a2a_rows"] * f_out / hw.net) if ep > 1 else 0.0
    w_node, w_nodes = _group_spread(world, 1, hw)
    d_node, d_nodes = _group_spread(dp, ep, hw)
    if sharding == "none":
        grad = allreduce_s(b["grad_world"], w_node, w_nodes, hw=hw)
    else:
        gather = allreduce_s(2 * p_rep, w_node, w_nodes, "gather", hw)
        per_micro = 2 * gather + allreduce_s(grad_bytes * p_rep, w_node, w_nodes, "scatter", hw)
        grad = micro * per_micro
    if sharding == "fsdp_all" and dp > 1:
        local = p_exp / ep
        gather = allreduce_s(2 * local, d_node, d_nodes, "gather", hw)
        grad += micro * (2 * gather + allreduce_s(grad_bytes * local, d_node, d_nodes, "scatter", hw))
    else:
        grad += allreduce_s(b["grad_dp"], d_node, d_nodes, hw=hw) if dp > 1 else 0.0
    # Optimizer step + clipping, memory-bound: AdamW reads weight, gradient, m, v and writes weight, m, v (28 bytes
    # per fp32 parameter held), the gradient norm reads the gradient again (4).
    held = (p_rep if sharding == "none" else p_rep / world) + (p_exp / world if sharding == "fsdp_all" else p_exp / ep)
    optim = 32 * held / hw.hbm
    total = compute + a2a + grad + optim
    # Memory: fp32 weight + fp32 gradient + Adam m and v = 16 bytes per parameter held, + 2 for the bf16 copy
    # autocast caches for the forward; FSDP-sharded parameters hold 16 / shards and gather bf16 units on the fly.
    acts = MICRO_SEQS * SEQ_LEN * act_bytes_per_token(cfg)
    embed_unit = cfg.vocab_size * cfg.d_model
    layer_experts = p_exp / cfg.n_layers / ep
    if sharding == "none":
        rep_mem = 18 * p_rep
    else:
        rep_mem = 16 * p_rep / world + 2 * 2 * embed_unit  # two gathered bf16 units in flight (the largest)
    if sharding == "fsdp_all":
        exp_mem = 16 * p_exp / ep / dp + 2 * 2 * layer_experts
    else:
        exp_mem = 18 * p_exp / ep
    mem = rep_mem + exp_mem + acts
    return {
        "world": world, "dp": dp, "ep": ep, "sharding": sharding, "tokens_per_gpu": tokens, "micro_batches": micro,
        "compute_s": compute, "a2a_s": a2a, "grad_s": grad, "optimizer_s": optim, "step_s": total,
        "a2a_share": a2a / total, "comm_share": (a2a + grad) / total,
        "tokens_per_s_per_gpu": tokens / total, "mfu": compute / total * hw.flops / hw.peak_flops,
        "a2a_bytes_per_gpu": b["a2a_rows"], "a2a_off_node_bytes": b["a2a_rows"] * f_out,
        "mem_non_expert": rep_mem, "mem_expert": exp_mem, "mem_activations": acts, "mem_total": mem,
        "fits": mem <= hw.usable * hw.memory,
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _ms(x: float) -> str:
    return f"{1e3 * x:,.0f}" if x >= 0.01 else f"{1e3 * x:.1f}"


def model_tables() -> str:
    cfg = big_config()
    counts = parameter_counts(cfg)
    f = flops_per_token(cfg)
    worlds = [8, 16, 32, 64, 128, 256, 512, 1024]
    eps = [1, 2, 4, 8, 16, 32, 64, 128]
    out = [
        f"Config: parameters total {counts['total']:,}, active {counts['active']:,}, experts {counts['expert']:,}, "
        f"non-expert {counts['total'] - counts['expert']:,}; training FLOPs per token {f['train'] / 1e9:.3f} G "
        f"(moekit's `flops_per_token` at T = {SEQ_LEN}); activations {act_bytes_per_token(cfg) / 1e6:.3f} MB per "
        f"token; all-to-all {collective_bytes(cfg, 1, 2, 1, 2, 4)['a2a_rows'] / 1e6:.3f} MB per token per GPU "
        "(all MoE layers, 4 exchanges, bf16).",
        "",
        "### Memory per GPU (GB)",
        "",
        "| ep | expert states | non-expert states, none | non-expert, fsdp at 8 / 1,024 GPUs | "
        "activations (1 x 4,096 tokens) | total none | total fsdp (8 GPUs) | fits 72 GB: none / fsdp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ep in eps:
        w = max(8, ep)
        a, b8, b1k = model_layout(w, ep, "none"), model_layout(w, ep, "fsdp"), model_layout(1024, ep, "fsdp")
        out.append(
            f"| {ep} | {_gb(a['mem_expert'])} | {_gb(a['mem_non_expert'])} | {_gb(b8['mem_non_expert'])} / "
            f"{_gb(b1k['mem_non_expert'])} | {_gb(a['mem_activations'])} | {_gb(a['mem_total'])} | "
            f"{_gb(b8['mem_total'])} | {'yes' if a['fits'] else 'no'} / {'yes' if b8['fits'] else 'no'} |"
        )
    out += [
        "",
        f"(For ep = 16 ... 128 the fsdp column is at {', '.join(str(max(8, e)) for e in eps[4:])} GPUs, the "
        "smallest world with that ep.)",
        "",
        "### Step time per GPU, layouts that fit (no overlap; ms)",
        "",
        "| GPUs | (dp, ep) | fits: none / fsdp | tokens / GPU | compute | all-to-all | gradient all-reduce (none) | "
        "FSDP collectives + expert all-reduce (fsdp) | optimizer (none) | step none | step fsdp | all-to-all share "
        "(none) | tokens/s/GPU (none) | MFU (none) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = []
    for w in worlds:
        rows = []
        for ep in eps:
            if ep > w:
                continue
            a, b = model_layout(w, ep, "none"), model_layout(w, ep, "fsdp")
            if not (a["fits"] or b["fits"]):
                continue
            if a["fits"]:
                rows.append(a)
            fit = f"{'yes' if a['fits'] else 'no'} / {'yes' if b['fits'] else 'no'}"
            out.append(
                f"| {w} | ({a['dp']}, {ep}) | {fit} | {a['tokens_per_gpu']:,} | {_ms(a['compute_s'])} | "
                f"{_ms(a['a2a_s'])} | "
                f"{_ms(a['grad_s'])} | {_ms(b['grad_s'])} | {_ms(a['optimizer_s'])} | {_ms(a['step_s'])} | "
                f"{_ms(b['step_s'])} | "
                f"{100 * a['a2a_share']:.0f}% | {a['tokens_per_s_per_gpu']:,.0f} | {100 * a['mfu']:.1f}% |"
            )
        best.append(min(rows, key=lambda r: r["step_s"]))
    out += [
        "",
        "### Fastest fitting layout per GPU count (sharding none)",
        "",
        "| GPUs | (dp, ep) | step (ms) | all-to-all share | gradient share | tokens/s (all GPUs) | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in best:
        out.append(
            f"| {a['world']} | ({a['dp']}, {a['ep']}) | {_ms(a['step_s'])} | {100 * a['a2a_share']:.0f}% | "
            f"{100 * a['grad_s'] / a['step_s']:.0f}% | {a['tokens_per_s_per_gpu'] * a['world'] / 1e6:.2f} M | "
            f"{100 * a['mfu']:.1f}% |"
        )
    out += [
        "",
        "### Experts FSDP-sharded over dp as well (fsdp_all), small ep",
        "",
        "| GPUs | (dp, ep) | memory (GB) | fits | compute | all-to-all | collectives | optimizer | step (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in (8, 64, 1024):
        for ep in (1, 2, 4, 8):
            c = model_layout(w, ep, "fsdp_all")
            out.append(
                f"| {w} | ({c['dp']}, {ep}) | {_gb(c['mem_total'])} | {'yes' if c['fits'] else 'no'} | "
                f"{_ms(c['compute_s'])} | {_ms(c['a2a_s'])} | {_ms(c['grad_s'])} | {_ms(c['optimizer_s'])} | "
                f"{_ms(c['step_s'])} |"
            )
    out += [
        "",
        "### Sensitivity (sharding none): tokens/s per GPU (all-to-all share / gradient share)",
        "",
        "| GPUs | (dp, ep) | as assumed | bf16 gradient all-reduce | network at 25 GB/s per GPU | global batch 2x "
        "(8.4 M tokens) | 1 sequence per GPU per step, no accumulation (moekit today) |",
        "|---|---|---|---|---|---|---|",
    ]
    slow_net = Hardware(net=HW.net / 2)
    for w, ep in ((64, 8), (64, 64), (256, 8), (256, 128), (1024, 8), (1024, 128)):
        cells = []
        for kw in ({}, {"grad_bytes": 2}, {"hw": slow_net}, {"global_seqs": 2 * GLOBAL_SEQS}, {"global_seqs": w}):
            r = model_layout(w, ep, "none", **kw)
            cells.append(
                f"{r['tokens_per_s_per_gpu']:,.0f} ({100 * r['a2a_share']:.0f}% / "
                f"{100 * r['grad_s'] / r['step_s']:.0f}%)"
            )
        out.append(f"| {w} | ({w // ep}, {ep}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="store_true", help="print the SCALING.md tables and exit (no processes)")
    p.add_argument("--batch-per-proc", type=int, default=4, help="sequences per process per step (weak scaling)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=512, help="dense FFN and expert hidden width")
    p.add_argument("--layers", type=int, default=4, help="blocks; every other FFN is an MoE")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--steps", type=int, default=8, help="timed steps per layout and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="times every layout runs (ratios per round)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_out.md"))
    args = p.parse_args(argv)
    if args.model:
        print(model_tables(), end="")
        return 0
    return measure(args, argv)


if __name__ == "__main__":
    sys.exit(main())
