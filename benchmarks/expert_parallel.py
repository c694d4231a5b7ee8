"""Expert-parallel training throughput on this machine: tokens/s at EP = 1 and EP = 2, and the all-to-all share.

Each configuration trains the same MoE language model on the same random global batches (forward, backward,
gradient sync, AdamW step), with gloo ranks started by ``torch.multiprocessing.spawn``. The time inside
``torch.distributed.all_to_all_single`` (token rows and their counts, forward and backward) is summed per rank;
the share reported is rank 0's all-to-all time over its step time. EP = 1 runs in one process without
torch.distributed, with 1 and with 2 threads (EP = 2 uses two single-threaded processes, i.e. the same 2 cores).

    .venv/bin/python benchmarks/expert_parallel.py            # writes benchmarks/results/expert_parallel.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.layers.config import MoEConfig
from moekit.models import TransformerLM
from moekit.models.config import LMConfig

ROOT = Path(__file__).resolve().parents[1]


def _model(args: argparse.Namespace) -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEConfig(
        d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k, capacity_factor=1.25
    )
    return TransformerLM(
        LMConfig(
            vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=4, d_ff=args.d_ff,
            max_seq_len=args.seq_len, moe=moe, moe_every=1, moe_offset=0,
        )
    )


def _train(rank: int, world: int, args: argparse.Namespace, port: int, threads: int, out: str) -> None:
    """Time ``args.steps`` training steps (after ``args.warmup``) on this rank; rank 0 writes the figures."""
    torch.set_num_threads(threads)
    a2a_s = [0.0]
    par = None
    model = _model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        raw = dist.all_to_all_single

        def timed(*a, **k):  # every all-to-all of the dispatcher goes through here, forward and backward
            t = time.perf_counter()
            r = raw(*a, **k)
            a2a_s[0] += time.perf_counter() - t
            return r

        dist.all_to_all_single = timed
        from moekit.training.distributed import ExpertParallel

        par = ExpertParallel(model)
        par.shard(opt)
    gen = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    step_s, a2a_per_step = [], []
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if par is not None:
            inputs, targets = par.local_rows(inputs), par.local_rows(targets)
            dist.barrier()  # start every step together, so the step time is the slowest rank's
        a2a_s[0] = 0.0
        t = time.perf_counter()
        res = model(inputs, targets)
        if par is None:
            res.loss.backward()
        else:
            (res.loss / world).backward()
            par.sync_gradients(params)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if par is not None:
            dist.barrier()
        if step >= args.warmup:
            step_s.append(time.perf_counter() - t)
            a2a_per_step.append(a2a_s[0])
    if rank == 0:
        med = statistics.median(step_s)
        Path(out).write_text(
            json.dumps(
                {
                    "step_ms": med * 1e3,
                    "tokens_per_s": args.batch * args.seq_len / med,
                    "a2a_share": (sum(a2a_per_step) / sum(step_s)) if world > 1 else 0.0,
                }
            )
        )
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, ep: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        if ep == 1:
            _train(0, 1, args, 0, threads, out)
        else:
            mp.spawn(_train, args=(ep, args, _free_port(), threads, out), nprocs=ep, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="blocks, every one MoE")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expert_parallel.md"))
    args = p.parse_args(argv)
    rows = []
    for ep, threads in ((1, 1), (1, 2), (2, 1)):
        r = measure(args, ep, threads)
        rows.append((ep, threads, r))
        print(f"EP={ep} threads/rank={threads}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_ms']:.1f} ms, "
              f"all-to-all {100 * r['a2a_share']:.1f}% of the step", flush=True)
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Expert-parallel training throughput",
        "",
        f"Command: `nice -n 10 .venv/bin/python benchmarks/expert_parallel.py{(' ' + cmd) if cmd else ''}`",
        "",
        f"Model: {args.layers} blocks, every FFN a MoE of {args.experts} experts (top-{args.top_k}, CF 1.25), "
        f"d_model {args.d_model}, d_ff {args.d_ff}; global batch {args.batch} x {args.seq_len} tokens; median of "
        f"{args.steps} AdamW steps after {args.warmup} warm-up. CPU, gloo, {os.cpu_count()} cores, 1-minute load "
        f"average {load:.1f} at the end (the machine is shared: treat the figures as indicative).",
        "",
        "| expert parallel | processes x threads | step (ms) | tokens/s | all-to-all share of the step |",
        "|---|---|---|---|---|",
    ]
    for ep, threads, r in rows:
        share = f"{100 * r['a2a_share']:.1f}%" if ep > 1 else "-"
        lines.append(f"| {ep} | {ep} x {threads} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {share} |")
    lines += [
        "",
        "The all-to-all share is rank 0's time inside `all_to_all_single` (rows and counts, forward and backward) over "
        "its step time; it includes waiting for the other rank to reach the exchange (uneven expert loads), not only "
        "the copy. EP = 2 and EP = 1 with 2 threads use the same 2 cores.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
