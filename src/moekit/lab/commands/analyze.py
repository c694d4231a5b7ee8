"""``moekit analyze RUN_DIR``: routing analysis of a trained MoE run over held-out text (default: the run's own
validation split). Writes ``trace.jsonl`` (one JSON object per token), ``trace.safetensors`` (the same, columnar),
``analysis.json`` and a self-contained ``report.html`` into ``--out`` (default ``RUN_DIR/analysis``). An
encoder-decoder run is traced on span-corruption examples, one trace per stack (``encoder_trace.*``,
``decoder_trace.*``), against the untrained model and a load-matched token hash (docs/ANALYSIS.md)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="routing analysis and HTML report of a trained MoE run")
    p.add_argument("run_dir", help="a run directory written by moekit train (an MoE model)")
    p.add_argument("--data", default=None, help="a text file or directory to analyse (default: the validation split)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/analysis)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens to analyse (whole windows; default 32768)")
    p.add_argument("--top-tokens", type=int, default=10, help="most frequent tokens listed per expert")
    p.add_argument("--permutations", type=int, default=100, help="shuffles for the chance baselines of the MI")
    p.add_argument("--hash-draws", type=int, default=20,
                   help="encoder-decoder runs: load-matched random token hashes per layer (the hash null model)")
    p.add_argument("--fallback", action="store_true",
                   help="if the newest checkpoint fails its checksum, use the newest one that passes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.errors import MoekitError
    from moekit.lab.analysis import analyze_run

    if args.max_tokens is not None and args.max_tokens < 1:
        raise MoekitError("--max-tokens must be positive")
    if args.permutations < 1 or args.top_tokens < 1 or args.hash_draws < 1:
        raise MoekitError("--permutations, --top-tokens and --hash-draws must be positive")

    def log(msg: str) -> None:
        print(f"moekit analyze: warning: {msg}", file=sys.stderr, flush=True)

    s = analyze_run(args.run_dir, args.out, data=args.data, max_tokens=args.max_tokens, top_n=args.top_tokens,
                    num_permutations=args.permutations, hash_draws=args.hash_draws, fallback=args.fallback, log=log)
    if s.get("arch") == "seq2seq":
        _print_seq2seq(s)
        return 0
    print(f"{s['num_tokens']:,} tokens of {s['data']}, checkpoint step {s['step']}")
    for layer in s["layers"]:
        ld = layer["load"]
        n_sig = sum(ex["p_value"] < 0.01 for ex in layer["experts"])
        print(
            f"block {layer['block']}: dropped {ld['dropped_share']:.3f}, entropy {ld['entropy']:.3f} nats "
            f"({ld['entropy_normalised']:.2f} of uniform), expert shares {min(ld['share_per_expert']):.3f}.."
            f"{max(ld['share_per_expert']):.3f}; category MI {layer['category_mi_bits']:.4f} bits (chance "
            f"{layer['category_mi_chance_bits']:.4f}); {n_sig}/{len(layer['experts'])} experts differ from the "
            "corpus mix at p < 0.01"
        )
    for a in s["agreement"]:
        print(
            f"block {a['from_block']} -> {a['to_block']}: best-successor share {a['best_successor_share']:.3f} "
            f"(chance {a['chance_successor_share']:.3f}), MI {a['mutual_information_bits']:.4f} bits"
        )
    print(f"report: {s['out_dir']}/report.html")
    return 0


def _print_seq2seq(s: dict) -> None:
    print(f"{s['num_examples']:,} span-corruption examples of {s['data']} ({s['input_len']} input / "
          f"{s['target_len']} target tokens), checkpoint step {s['step']}")
    for stack in s["stacks"].values():
        for layer in stack["layers"]:
            ld = layer["load"]
            print(
                f"{layer['name']}: dropped {ld['dropped_share']:.3f}, entropy {ld['entropy_normalised']:.2f} of "
                f"uniform; category MI {layer['category_mi_bits']:.4f} bits (untrained "
                f"{layer['untrained']['category_mi_bits']:.4f}, load-matched hash "
                f"{layer['hash']['mutual_information_bits']:.4f}, shuffled {layer['category_mi_chance_bits']:.4f})"
            )
    for line in s["stack_summary"]:
        print(
            f"{line['stack']} (mean of {len(line['layers'])} MoE layers, H(category) "
            f"{line['category_entropy_bits']:.3f} bits): trained MI {line['trained_mi_bits']:.4f}, untrained "
            f"{line['untrained_mi_bits']:.4f}, hash {line['hash_mi_bits']:.4f}, shuffled "
            f"{line['shuffled_mi_bits']:.4f} bits"
        )
    print(f"report: {s['out_dir']}/report.html")
