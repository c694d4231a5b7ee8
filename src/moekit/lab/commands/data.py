"""``moekit data filter``: GLaM's data-quality filter from the command line.

Train a quality classifier on curated (``--positives``) and noisy (``--negatives``) text, or load one
(``--classifier``), report its held-out precision / recall / AUC, score every document of ``--input`` and write
them to ``OUTPUT/kept/`` or ``OUTPUT/dropped/`` (each document to exactly one), with ``scores.jsonl`` (one line per
document), ``summary.json`` and, when trained here, the classifier in ``OUTPUT/classifier/``.

A path is a directory (one document per non-hidden file, recursive, sorted; the relative path is the document's
name), a ``.jsonl`` file (one ``{"text": ...}`` object per line) or any other file (one document). Everything is
written into a temporary directory beside OUTPUT and renamed at the end: a failure leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moekit.atomic import atomic_dir
from moekit.errors import MoekitError
from moekit.lab.data.corpus import _decode  # one place decides what "binary" and "not UTF-8" mean


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: the GLaM quality filter")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True
    f = dsub.add_parser(
        "filter",
        help="train (or load) a quality classifier and filter a corpus with it",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--positives", nargs="+", default=[], metavar="PATH", help="curated text (label 1)")
    f.add_argument("--negatives", nargs="+", default=[], metavar="PATH", help="noisy text (label 0)")
    f.add_argument("--input", required=True, metavar="CORPUS", help="the corpus to score and filter")
    f.add_argument("--output", required=True, metavar="DIR", help="output directory (must not exist)")
    f.add_argument(
        "--classifier", metavar="PATH", help="load this saved classifier instead of training one; with "
        "--positives/--negatives given too, those are all used as evaluation data"
    )
    rule = f.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="keep documents with score >= T")
    rule.add_argument(
        "--pareto-alpha", type=float, help="keep a document when numpy's pareto(A) > 1 - score (GPT-3/GLaM; "
        "the default rule, with A = 9 as in GPT-3)"
    )
    f.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the Pareto draws")
    f.add_argument("--holdout", type=float, default=0.2, help="share of each class held out for evaluation")
    f.add_argument("--n-features", type=int, default=None, help="hash buckets (default 2**18)")
    f.add_argument("--max-chars", type=int, default=None, help="characters of a document featurised (8000)")
    f.add_argument("--progress", choices=("auto", "bar", "plain", "off"), default="auto")
    f.set_defaults(func=run)


def read_documents(path: str | Path, what: str) -> list[tuple[str, str]]:
    """``(name, text)`` of every document under ``path`` (see the module docstring); a clear error for a missing
    path, an empty directory, a binary or non-UTF-8 file, bad JSONL, or text that is all blank."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MoekitError(f"{what} path {str(p)!r} does not exist")
    docs: list[tuple[str, str]] = []
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        for f in files:
            docs.append((f.relative_to(p).as_posix(), _decode(f.read_bytes(), str(f))))
    elif p.suffix == ".jsonl":
        text = _decode(p.read_bytes(), str(p))
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoekitError(f"{p} line {i + 1}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise MoekitError(f"{p} line {i + 1}: expected an object with a string field 'text'")
            docs.append((f"{i:08d}.txt", obj["text"]))
    else:
        docs.append((p.name, _decode(p.read_bytes(), str(p))))
    if not any(text.strip() for _, text in docs):
        raise MoekitError(f"{what} {str(p)!r} is empty (no non-blank document)")
    return docs


def _read_many(paths: list[str], what: str) -> list[str]:
    return [text for path in paths for _, text in read_documents(path, what) if text.strip()]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from moekit.lab.data.quality import QualityClassifier, QualityConfig, evaluate, keep_mask, split_holdout
    from moekit.training.metrics import Progress

    t0 = time.perf_counter()
    alpha = args.pareto_alpha if args.threshold is None and args.pareto_alpha is not None else None
    if args.threshold is None and alpha is None:
        alpha = 9.0
    keep_mask(np.zeros(0), threshold=args.threshold, pareto_alpha=alpha)  # validates the rule before any work
    out = Path(args.output).expanduser()
    if out.exists():
        raise MoekitError(f"output {str(out)!r} already exists; give a new directory")
    if args.classifier is None and (not args.positives or not args.negatives):
        raise MoekitError("give --positives and --negatives to train a classifier, or --classifier PATH")

    def log(msg: str) -> None:
        if args.progress != "off":
            print(msg, file=sys.stderr, flush=True)

    # Read everything first: a bad file fails the command before any slow step and before any output exists.
    positives = _read_many(args.positives, "--positives")
    negatives = _read_many(args.negatives, "--negatives")
    corpus = read_documents(args.input, "--input")

    def progress(label: str) -> Callable[[int, int], None]:
        bar = Progress(1, args.progress)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done, label)
            if done == total:
                bar.close()

        return update

    metrics: dict | None = None
    if args.classifier is not None:
        clf = QualityClassifier.load(args.classifier)
        log(f"loaded the quality classifier from {args.classifier}")
        if positives and negatives:
            m = evaluate(clf.score(positives), clf.score(negatives))
            metrics = {"evaluated_on": "all of --positives / --negatives", **m.__dict__}
            log(f"on --positives/--negatives: {m.line()}")
    else:
        overrides = {
            k: v for k, v in (("n_features", args.n_features), ("max_chars", args.max_chars)) if v is not None
        }
        config = QualityConfig(**overrides)
        pos_tr, pos_te = split_holdout(len(positives), args.holdout, args.seed)
        neg_tr, neg_te = split_holdout(len(negatives), args.holdout, args.seed + 1)
        log(
            f"training the quality classifier on {len(pos_tr)} positive and {len(neg_tr)} negative documents "
            f"({len(pos_te)} and {len(neg_te)} held out)"
        )
        fit_clf = QualityClassifier.fit(
            [positives[i] for i in pos_tr], [negatives[i] for i in neg_tr], config, progress("featurising")
        )
        m = evaluate(fit_clf.score([positives[i] for i in pos_te]), fit_clf.score([negatives[i] for i in neg_te]))
        metrics = {"evaluated_on": f"held out ({args.holdout:g} of each class, seed {args.seed})", **m.__dict__}
        log(f"held out: {m.line()}")
        fit_clf.metrics = metrics
        clf = fit_clf

    texts = [text for _, text in corpus]
    log(f"scoring {len(texts)} documents of {args.input}")
    scores = clf.score(texts, progress("scoring"))
    keep = keep_mask(scores, threshold=args.threshold, pareto_alpha=alpha, seed=args.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for sub in ("kept", "dropped"):
            (tmp / sub).mkdir()
        with open(tmp / "scores.jsonl", "w", encoding="utf-8") as f:
            for (name, text), s, k in zip(corpus, scores, keep, strict=True):
                dest = tmp / ("kept" if k else "dropped") / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text, encoding="utf-8")
                f.write(json.dumps({"name": name, "score": round(float(s), 6), "kept": bool(k)}) + "\n")
        if args.classifier is None:
            clf.save(tmp / "classifier")
        n_kept = int(keep.sum())
        chars = np.array([len(t) for t in texts])
        summary = {
            "input": str(args.input),
            "documents": len(texts),
            "kept": n_kept,
            "dropped": len(texts) - n_kept,
            "kept_fraction": n_kept / len(texts),
            "chars_kept": int(chars[keep].sum()),
            "chars_dropped": int(chars[~keep].sum()),
            "rule": {"threshold": args.threshold} if args.threshold is not None else {
                "pareto_alpha": alpha, "seed": args.seed,
                "keep": "numpy.random.default_rng(seed).pareto(alpha) > 1 - score",
            },
            "score_quantiles": {str(q): float(np.quantile(scores, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)},
            "mean_score": float(scores.mean()),
            "classifier": str(args.classifier) if args.classifier else "classifier/ (trained here)",
            "classifier_config": clf.config.__dict__ | {"word_ngrams": list(clf.config.word_ngrams),
                                                        "char_ngrams": list(clf.config.char_ngrams)},
            "classifier_metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"kept {n_kept} of {len(texts)} documents ({n_kept / len(texts):.1%}; {summary['chars_kept']:,} of "
        f"{int(chars.sum()):,} characters) -> {out}/kept, the rest in {out}/dropped"
    )
    return 0
