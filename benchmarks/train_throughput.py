"""Training throughput (tokens/s) of switch-tiny against dense-tiny, its FLOP-matched dense model, in one run.

Three models are timed: switch-tiny as configured (capacity factor 1.25), switch-tiny made dropless
(``moe.capacity_factor = "none"``), and dense-tiny. Early in training a top-1 router sends most tokens to a few
experts and capacity drops many of them, so the configured model then does *less* expert work than the dense
one; the dropless variant runs exactly one expert per token whatever the routing, i.e. exactly the dense model's
active FLOPs (router aside), so ``dropless / dense`` is the ratio at equal active FLOPs.

All train on the same kind of batches of the built-in corpus (a 300 k-character slice, so the setup takes
seconds) with AdamW, forward + backward + clipping + optimizer step, as ``moekit train`` runs them. They are timed
in interleaved rounds (the order rotating), because this kind of machine shows intermittent ~2x slow-downs
(docs/ALGORITHMS.md section 17); each figure is the median over rounds, and each ratio the median of per-round ratios.

    python benchmarks/train_throughput.py            # writes benchmarks/results/train_throughput.{md,json}
    python benchmarks/train_throughput.py --rounds 3 --steps 2 --out /tmp/tp   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moekit.data.batches import TokenBatches
from moekit.lab.data.corpus import builtin_documents
from moekit.lab.data.split import cut_pieces, split_pieces
from moekit.lab.data.tokenizer import encode_pieces, train_tokenizer
from moekit.lab.training.run_config import load_run_config
from moekit.models import TransformerLM, flops_per_token, parameter_counts
from moekit.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
MOE, DROPLESS, DENSE = "switch-tiny", "switch-tiny-dropless", "dense-tiny"


def _step(model, optimizer, inputs, targets, bf16: bool) -> list[float]:
    """One training step; returns the MoE layers' drop fractions."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
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
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the router stays float32)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    switch_toml = ROOT / "configs" / "switch-tiny.toml"
    configs = {
        MOE: load_run_config(switch_toml),
        DROPLESS: load_run_config(switch_toml, ["moe.capacity_factor=none"]),
        DENSE: load_run_config(ROOT / "configs" / "dense-tiny.toml"),
    }
    first = configs[MOE]
    pieces = cut_pieces(builtin_documents(), first.data.piece_chars, 300_000)
    train_pieces, _ = split_pieces(pieces, first.data.val_fraction)
    tok = train_tokenizer([t for _, t, _ in train_pieces], first.data.vocab_size)
    tokens = encode_pieces(tok, train_pieces)
    vocab = tok.get_vocab_size()

    models, optims, batches, info = {}, {}, {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        lm_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
        models[name] = TransformerLM(lm_cfg).train()
        optims[name] = build_optimizer(models[name], cfg.train)
        batches[name] = TokenBatches(tokens, cfg.train.batch_size, cfg.data.seq_len, seed=0)
        counts = parameter_counts(lm_cfg)
        info[name] = {
            "parameters_total": counts["total"],
            "parameters_active": counts["active"],
            "train_flops_per_token": flops_per_token(lm_cfg, cfg.data.seq_len)["train"],
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        }
    for name in models:
        for _ in range(args.warmup):
            _step(models[name], optims[name], *batches[name].next_batch(), args.bf16)

    names = list(models)
    rates: dict[str, list[float]] = {name: [] for name in names}
    drops: list[float] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            data = [batches[name].next_batch() for _ in range(args.steps)]
            t0 = time.perf_counter()
            for inputs, targets in data:
                d = _step(models[name], optims[name], inputs, targets, args.bf16)
                if name == MOE:
                    drops.extend(d)
            elapsed = time.perf_counter() - t0
            rates[name].append(args.steps * info[name]["tokens_per_step"] / elapsed)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in names), flush=True)

    def ratio(a: str, b: str) -> tuple[float, list[float]]:
        per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        return statistics.median(per_round), per_round

    equal_flops, equal_flops_rounds = ratio(DROPLESS, DENSE)
    configured, configured_rounds = ratio(MOE, DENSE)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "precision": "bf16" if args.bf16 else "float32",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "models": {
            n: {**info[n], "median_tokens_per_s": statistics.median(rates[n]), "tokens_per_s": rates[n]} for n in names
        },
        "ratio_dropless_moe_over_dense": equal_flops,
        "ratio_dropless_moe_over_dense_per_round": equal_flops_rounds,
        "ratio_cf125_moe_over_dense": configured,
        "ratio_cf125_moe_over_dense_per_round": configured_rounds,
        "cf125_mean_drop_fraction": sum(drops) / max(1, len(drops)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(result, indent=1))
    rows = []
    for name, label in (
        (MOE, "switch-tiny (8 experts, top-1, CF 1.25)"),
        (DROPLESS, "switch-tiny, dropless"),
        (DENSE, "dense-tiny (FLOP-matched)"),
    ):
        m = result["models"][name]
        rows.append(
            f"| {label} | {m['parameters_total']:,} / {m['parameters_active']:,} | "
            f"{m['train_flops_per_token'] / 1e6:.2f} M | {m['median_tokens_per_s']:.0f} |"
        )
    md = [
        "# Training throughput: switch-tiny vs dense-tiny",
        "",
        f"`python benchmarks/train_throughput.py` on {result['machine']}, torch {result['torch']},"
        f" {args.threads} threads, {result['precision']}; {args.rounds} interleaved rounds of {args.steps} steps"
        f" per model (forward + backward + AdamW), {info[MOE]['tokens_per_step']} tokens per step; medians.",
        "",
        "| model | parameters (total / active) | training FLOPs / token | tokens/s (median) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- At equal active FLOPs (dropless MoE / dense): **{equal_flops:.2f}x** (median of per-round ratios;"
        " target >= 0.85x).",
        f"- As configured (CF 1.25) / dense: {configured:.2f}x, with a mean drop fraction of"
        f" {result['cf125_mean_drop_fraction']:.3f} at this early point of training (dropped tokens skip the"
        " experts, so this ratio flatters the MoE model early on).",
        "",
    ]
    (out / "train_throughput.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
