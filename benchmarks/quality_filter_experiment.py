"""The GLaM data-quality experiment (issue 10): build the data, then score trained LMs on held-out curated text.

    python benchmarks/quality_filter_experiment.py prepare ROOT        # classifier data, mixed corpus, held-out text
    moekit data filter --positives ROOT/positives --negatives ROOT/negatives --input ROOT/mixed --output ROOT/filtered
    python benchmarks/quality_filter_experiment.py subset ROOT         # ROOT/random: random docs of mixed, same chars
    moekit train ... --set data.corpus=ROOT/{mixed,filtered/kept,random}
    python benchmarks/quality_filter_experiment.py eval ROOT RUN_DIR...  # loss on ROOT/heldout

Data (all real, docs/DATA.md). Curated prose: Brown (500 documents), State of the Union (233 speeches), Moby Dick (136
chapters), each source's *documents* shuffled (seed 0) and split 30% / 55% / 15% into classifier positives, the
curated half of the mixed corpus, and held-out evaluation text, so no document is in two roles. Curated documents
are cut into pieces of about 3,000 characters (at line breaks) so curated "documents" are of a size with mails.
Noisy text: the 6,046 raw SpamAssassin mails (ham and spam, headers and all) split 40% / 60% into classifier
negatives and the mixed corpus' pool. The mixed corpus holds ``--curated-chars`` characters of curated pieces and as
many characters of mails (half noisy, by characters).

Evaluation. The three runs train their own BPE tokenizers on their own corpora, so losses per token are not
comparable across runs; ``eval`` reports nats per token *and* bits per byte of the held-out UTF-8 text (total
nats / ln 2 / bytes of the predicted tokens), the comparable figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

PIECE_CHARS = 3000


def _write_docs(root: Path, docs: list[tuple[str, str]]) -> int:
    root.mkdir(parents=True, exist_ok=False)
    for name, text in docs:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sum(len(t) for _, t in docs)


def _pieces(source: str, docs: list[str], ids: np.ndarray) -> list[tuple[str, str]]:
    from moekit.lab.data.split import cut_pieces

    out = []
    for i in ids:
        for j, (_, text, _) in enumerate(cut_pieces([docs[i]], PIECE_CHARS)):
            if text.strip():
                out.append((f"{source}/{source}-{i:03d}-{j:03d}.txt", text))
    return out


def prepare(args: argparse.Namespace) -> None:
    from moekit.lab.data.text_sources import brown_documents, moby_dick_documents, sotu_documents, spam_assassin_mails

    root = Path(args.root)
    rng = np.random.default_rng(args.seed)
    sources = {"brown": brown_documents(), "sotu": sotu_documents(), "moby": moby_dick_documents()}
    positives, curated_b, heldout = [], [], []
    for name, docs in sources.items():
        perm = rng.permutation(len(docs))
        a, b = round(0.30 * len(docs)), round(0.85 * len(docs))
        positives += _pieces(name, docs, np.sort(perm[:a]))
        curated_b += _pieces(name, docs, np.sort(perm[a:b]))
        # Held-out text: whole documents, at most --heldout-chars per source (an even mix of the three).
        held, n = [], 0
        for i in np.sort(perm[b:]):
            if n >= args.heldout_chars:
                break
            text = docs[i][: args.heldout_chars - n]
            held.append((f"{name}/{name}-{i:03d}.txt", text))
            n += len(text)
        heldout += held
    mails = spam_assassin_mails()
    perm = rng.permutation(len(mails))
    k = round(0.40 * len(mails))
    negatives = [(f"mail/{mails[i][0]}", mails[i][1]) for i in np.sort(perm[:k])]
    pool = [(f"mail/{mails[i][0]}", mails[i][1]) for i in perm[k:]]  # shuffled order
    # The mixed corpus: a random sample of curated pieces up to --curated-chars, then mails up to as many characters.
    order = rng.permutation(len(curated_b))
    mixed, n = [], 0
    for i in order:
        if n >= args.curated_chars:
            break
        mixed.append(curated_b[i])
        n += len(curated_b[i][1])
    curated_chars, m = n, 0
    for name, text in pool:
        if m >= curated_chars:
            break
        mixed.append((name, text))
        m += len(text)
    manifest = {
        "seed": args.seed,
        "positives": {"documents": len(positives), "chars": _write_docs(root / "positives", positives)},
        "negatives": {"documents": len(negatives), "chars": _write_docs(root / "negatives", negatives)},
        "mixed": {"documents": len(mixed), "chars": _write_docs(root / "mixed", sorted(mixed)),
                  "curated_chars": curated_chars, "mail_chars": m,
                  "curated_documents": sum(1 for nm, _ in mixed if not nm.startswith("mail/"))},
        "heldout": {"documents": len(heldout), "chars": _write_docs(root / "heldout", heldout)},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(manifest, indent=2))


def subset(args: argparse.Namespace) -> None:
    """ROOT/random: documents of ROOT/mixed in a seeded random order until as many characters as the filter kept."""
    root = Path(args.root)
    kept_files = sorted(p for p in (root / "filtered" / "kept").rglob("*") if p.is_file())
    kept = sum(len(p.read_text(encoding="utf-8")) for p in kept_files)
    files = sorted(p for p in (root / "mixed").rglob("*") if p.is_file())
    rng = np.random.default_rng(args.seed)
    chosen, n = [], 0
    for i in rng.permutation(len(files)):
        if n >= kept:
            break
        text = files[i].read_text(encoding="utf-8")
        chosen.append((files[i].relative_to(root / "mixed").as_posix(), text))
        n += len(text)
    _write_docs(root / "random", chosen)
    n_mail = sum(1 for name, _ in chosen if name.startswith("mail/"))
    mail_chars = sum(len(t) for name, t in chosen if name.startswith("mail/"))
    info = {"documents": len(chosen), "chars": n, "target_chars": kept, "mail_documents": n_mail,
            "mail_chars": mail_chars, "seed": args.seed}
    (root / "random.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(info))


def heldout_loss(run_dir: str | Path, texts: list[str], batch_size: int = 16) -> dict[str, float]:
    """Cross-entropy of a run's newest valid checkpoint on ``texts`` (cut and tokenised as the trainer does):
    nats per token and bits per UTF-8 byte of the predicted tokens."""
    import torch

    from moekit.data.batches import eval_windows
    from moekit.errors import MoekitError
    from moekit.lab.data.split import cut_pieces
    from moekit.lab.data.tokenizer import encode_pieces, load_tokenizer
    from moekit.lab.training.run import load_run
    from moekit.training import checkpoint as ckpt

    run_config, _, model = load_run(run_dir)
    if run_config.train.threads > 0:  # as the run trained: share the machine
        torch.set_num_threads(run_config.train.threads)
    found = ckpt.latest_valid_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        raise MoekitError(f"no valid checkpoint in {run_dir}")
    path, blobs = found
    state = ckpt.load_checkpoint(blobs, model)
    tok = load_tokenizer(Path(run_dir) / "tokenizer.json")
    tokens = encode_pieces(tok, cut_pieces(texts, run_config.data.piece_chars))
    # Byte-level BPE: each character of a token's string stands for one byte; the end-of-text token is no text.
    vocab = tok.get_vocab()
    nbytes = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for s, i in vocab.items():
        nbytes[i] = 0 if s == "<|endoftext|>" else len(s)
    model.eval()
    total_nats, n_tok, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in eval_windows(tokens, batch_size, run_config.data.seq_len, None):
            logits = model(inputs).logits_BTV.float()
            total_nats += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            n_tok += targets.numel()
            n_bytes += int(nbytes[targets.numpy()].sum())
    return {"checkpoint": path.name, "step": state["step"], "tokens": n_tok, "bytes": n_bytes,
            "nats_per_token": total_nats / n_tok, "bits_per_byte": total_nats / math.log(2) / n_bytes}


def evaluate_runs(args: argparse.Namespace) -> None:
    root = Path(args.root)
    texts = [p.read_text(encoding="utf-8") for p in sorted((root / "heldout").rglob("*")) if p.is_file()]
    results = {}
    for run_dir in args.runs:
        r = heldout_loss(run_dir, texts)
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        r["own_val_loss"] = summary.get("final_val_loss")
        results[run_dir] = r
        print(f"{run_dir}: held-out {r['nats_per_token']:.4f} nats/token, {r['bits_per_byte']:.4f} bits/byte "
              f"({r['tokens']} tokens, {r['bytes']} bytes; {r['checkpoint']}); own validation loss "
              f"{r['own_val_loss']:.4f}", flush=True)
    out = root / "heldout_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curated-chars", type=int, default=4_000_000)
    p.add_argument("--heldout-chars", type=int, default=150_000, help="per curated source")
    p.set_defaults(func=prepare)
    p = sub.add_parser("subset")
    p.add_argument("root")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=subset)
    p = sub.add_parser("eval")
    p.add_argument("root")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=evaluate_runs)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
