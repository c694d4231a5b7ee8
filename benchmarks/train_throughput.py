"""Training throughput (tokens/s) of switch-tiny against dense-tiny, its FLOP-matched dense model, in one run.

Both models train on the same batches of the built-in corpus (a 300 k-character slice, so the setup takes
seconds)
with AdamW, forward + backward + optimizer step, the way ``moekit train`` runs them. The two are timed in
interleaved rounds (the order alternating), because this kind of machine shows intermittent ~2x slow-downs
(PERFORMANCE.md); the figure is the median over rounds, and the ratio is taken within each round.

    python benchmarks/train_throughput.py            # writes benchmarks/results/train_throughput.{md,json}
    python benchmarks/train_throughput.py --rounds 3 --steps 2 --out /tmp/tp   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moekit.data.batches import TokenBatches
from moekit.data.corpus import builtin_documents
from moekit.data.split import cut_pieces, split_pieces
from moekit.data.tokenizer import encode_pieces, train_tokenizer
from moekit.models import TransformerLM, flops_per_token, parameter_counts
from moekit.training.optim import build_optimizer
from moekit.training.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def _step(model, optimizer, inputs, targets, autocast: bool) -> list[float]:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(inputs, targets)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return [float(a.drop_fraction) for a in out.aux]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (router stays float32)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    configs = {
        name: load_run_config(ROOT / "configs" / f"{name}.toml") for name in ("switch-tiny", "dense-tiny")
    }
    first = configs["switch-tiny"]
    pieces = cut_pieces(builtin_documents(), first.data.piece_chars, 300_000)
    train_pieces, _ = split_pieces(pieces, first.data.val_fraction)
    tok = train_tokenizer([t for _, t, _ in train_pieces], first.data.vocab_size)
    tokens = encode_pieces(tok, train_pieces)
    vocab = tok.get_vocab_size()

    models, optims, batches, info = {}, {}, {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        lm_cfg = cfg.lm_config(vocab)
        models[name] = TransformerLM(lm_cfg).train()
        optims[name] = build_optimizer(models[name], cfg.train)
        batches[name] = TokenBatches(tokens, cfg.train.batch_size, cfg.data.seq_len, seed=0)
        info[name] = {
            "parameters_total": parameter_counts(lm_cfg)["total"],
            "parameters_active": parameter_counts(lm_cfg)["active"],
            "train_flops_per_token": flops_per_token(lm_cfg, cfg.data.seq_len)["train"],
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        }
    for name in models:
        for _ in range(args.warmup):
            _step(models[name], optims[name], *batches[name].next_batch(), args.bf16)

    rates: dict[str, list[float]] = {name: [] for name in models}
    drops: list[float] = []
    names = list(models)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            data = [batches[name].next_batch() for _ in range(args.steps)]
            t0 = time.perf_counter()
            for inputs, targets in data:
                d = _step(models[name], optims[name], inputs, targets, args.bf16)
                if d:
                    drops.extend(d)
            elapsed = time.perf_counter() - t0
            rates[name].append(args.steps * info[name]["tokens_per_step"] / elapsed)
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in names),
            flush=True,
        )

    per_round = [m / d for m, d in zip(rates["switch-tiny"], rates["dense-tiny"], strict=True)]
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "precision": "bf16" if args.bf16 else "float32",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "models": {
            n: {**info[n], "median_tokens_per_s": statistics.median(rates[n]), "tokens_per_s": rates[n]}
            for n in names
        },
        "ratio_moe_over_dense_median_of_rounds": statistics.median(per_round),
        "ratio_moe_over_dense_per_round": per_round,
        "moe_mean_drop_fraction": sum(drops) / max(1, len(drops)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(result, indent=1))
    sw, de = result["models"]["switch-tiny"], result["models"]["dense-tiny"]
    md = [
        "# Training throughput: switch-tiny vs dense-tiny (FLOP-matched)",
        "",
        f"`python benchmarks/train_throughput.py` on {result['machine']}, torch {result['torch']}, "
        f"{args.threads} threads, {result['precision']}; {args.rounds} interleaved rounds of"
        f" {args.steps} steps "
        f"(forward + backward + AdamW), batch {sw['tokens_per_step']} tokens; medians.",
        "",
        "| model | parameters (total / active) | training FLOPs / token | tokens/s (median) |",
        "|---|---|---|---|",
        f"| switch-tiny (8 experts, top-1, CF 1.25) | {sw['parameters_total']:,} /"
        f" {sw['parameters_active']:,} | "
        f"{sw['train_flops_per_token'] / 1e6:.2f} M | {sw['median_tokens_per_s']:.0f} |",
        f"| dense-tiny | {de['parameters_total']:,} / {de['parameters_active']:,} | "
        f"{de['train_flops_per_token'] / 1e6:.2f} M | {de['median_tokens_per_s']:.0f} |",
        "",
        f"MoE / dense tokens/s: **{result['ratio_moe_over_dense_median_of_rounds']:.2f}x** (median of"
        f" per-round ratios; target >= 0.85x). Mean MoE drop fraction during the timing: "
        f"{result['moe_mean_drop_fraction']:.3f}.",
        "",
    ]
    (out / "train_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
