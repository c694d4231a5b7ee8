"""GLaM's data-quality filter (GLaM section 3, Table 7 and Fig. 4): does a language model trained on the corpus a
quality classifier kept do better on curated text than one trained on the unfiltered corpus, or on a random subset
of the same size, for the same compute (so several epochs of the smaller, filtered corpus)?

GLaM trained a linear classifier with curated text (books, Wikipedia) as positives and web pages as negatives,
kept web pages by its score (GPT-3's Pareto rule), and found the filtered data better for the model than the
unfiltered data. The directions checked here, each a paired difference over seeds of held-out bits per byte:

1. filtered minus mixed on curated text from sources the classifier never saw as positives (paper's side:
   negative, the filtered corpus is better);
2. filtered minus a random subset of the mixed corpus with as many characters as the filter kept, on the same text
   (paper's side: negative; this separates *which* documents are kept from *how many*).

Data (all offline, docs/DATA.md; one fixed split, ``--data-seed``). Curated prose from four sources: Brown and the
State of the Union (the classifier's sources) and Moby Dick and Shakespeare (sources it never sees as positives).
Every source's *documents* are shuffled and split, so no document has two roles: Brown and State of the Union 30 %
classifier positives / 55 % pool / 15 % held out; Moby Dick and Shakespeare 85 % pool / 15 % held out. Curated
documents are cut into pieces of about 3,000 characters. The noisy side is mail *prose*: the SpamAssassin mails'
bodies with the headers, MIME structure, transfer encodings and HTML taken away
(:func:`moekit.lab.data.mail_text.mail_body_text`; bodies under 200 characters and exact duplicates dropped), split
35 % classifier negatives / 55 % pool / 10 % held out. So the classifier has to tell curated prose from mail prose,
not prose from mail headers.

The mixed corpus: ``--curated-chars`` characters of pool pieces from each of the four curated sources and as many
characters of pool mails in all (half mail by characters). The classifier
(:class:`moekit.lab.data.quality.QualityClassifier`, as ``moekit data filter`` fits it) is fitted once on the
positives and negatives, and scores every document of the mixed corpus. Per seed ``s``: the filtered corpus keeps a
document when ``default_rng(s).pareto(9) > 1 - score`` (GPT-3's rule, as ``moekit data filter``); the random
subset takes documents of the mixed corpus in a ``default_rng(1000 + s)`` order until it has as many characters as
that seed's filtered corpus.

Every run: ``configs/repro/glam-every2.toml`` (a 4-block decoder, d_model 64, top-2 of 8 experts in blocks 1 and
3), one BPE tokenizer of 2,048 tokens trained on the whole mixed corpus and given to every run
(``data.tokenizer_file``), so bits per byte and nats per token compare across arms. The same number of steps for
every arm: ``--epochs`` epochs of seed 0's filtered corpus (its training split) at 16 x 128 tokens a step; the
mixed corpus gets fewer epochs in the same steps, the random subset as many. Seed ``s`` of every arm starts from
the same weights. After the last step each run is scored on the held-out text: Moby Dick and Shakespeare (the
sources unseen as positives, ``--heldout-chars`` characters each; the claims are about these), Brown and State of
the Union (the classifier's sources), and held-out mail bodies (where the filtered model should be worse). Bits
per byte: total nats / ln 2 / the UTF-8 bytes the predicted tokens stand for.

A direction is "reproduced" when the 95 % t interval of the paired difference excludes 0 on the paper's side,
"contradicted" when it excludes it on the other, otherwise "not resolved at this scale". The seed noise of each arm
(its standard deviation over seeds) is printed with the table.

Usage (runs in parallel, one thread each; the defaults take about 40 minutes on 2 free cores)::

    python benchmarks/repro/quality_filter.py --out docs/results/quality_filter [--runs runs/quality-filter]
    python benchmarks/repro/quality_filter.py --out docs/results/quality_filter --section docs/RESULTS.md

The data is built once into ``--runs``/data (reused by a rerun with the same data flags) and finished runs are
skipped; ``results.json``, ``runs.csv``, ``results.md`` and ``heldout.png`` are written into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interval, verdict, wrap_markdown, write_outputs  # noqa: E402
from _runs import log, run_all, study_main, study_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "repro" / "glam-every2.toml")
HEADING = "## GLaM data-quality filter: filtered vs unfiltered vs random subset, several epochs (GLaM section 3)"
ARMS = ("mixed", "filtered", "random")
POSITIVE_SOURCES = ("brown", "sotu")  # the classifier's positives come from these
UNSEEN_SOURCES = ("moby", "shakespeare")  # curated, but never positives: the claims' evaluation text
HELDOUT_SETS = ("unseen", "moby", "shakespeare", "classifier_sources", "mail")
PIECE_CHARS = 3000
MIN_MAIL_CHARS = 200
VOCAB = 2048
TOKENS_PER_STEP = 16 * 128
PARETO_ALPHA = 9.0
PLOT = "heldout.png"
# The data flags: data built with other values is not reused.
DATA_KEYS = ("data_seed", "curated_chars", "heldout_chars", "max_mails")


# -- data --------------------------------------------------------------------------------------------------------


def _split(n: int, shares: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """A random partition of ``range(n)`` into consecutive shares (the last takes the rest), each sorted."""
    perm = rng.permutation(n)
    cuts = np.round(np.cumsum(shares[:-1]) * n).astype(int)
    return [np.sort(part) for part in np.split(perm, cuts)]


def _pieces(source: str, docs: list[str], ids: np.ndarray) -> list[tuple[str, str]]:
    """``(name, text)`` pieces of about PIECE_CHARS characters of the documents ``ids``."""
    from moekit.lab.data.split import cut_pieces

    out = []
    for i in ids:
        for j, (_, text, _) in enumerate(cut_pieces([docs[i]], PIECE_CHARS)):
            if text.strip():
                out.append((f"{source}-{i:05d}-{j:03d}", text))
    return out


def _heldout(source: str, docs: list[str], ids: np.ndarray, limit: int) -> list[tuple[str, str]]:
    """Whole held-out documents in order until ``limit`` characters (the last one cut)."""
    out, n = [], 0
    for i in ids:
        if n >= limit:
            break
        text = docs[i][: limit - n]
        out.append((f"{source}-{i:05d}", text))
        n += len(text)
    return out


def _take(docs: list[tuple[str, str]], order: np.ndarray, limit: int) -> list[tuple[str, str]]:
    """Documents of ``docs`` in ``order`` until they hold ``limit`` characters."""
    out, n = [], 0
    for i in order:
        if n >= limit:
            break
        out.append(docs[i])
        n += len(docs[i][1])
    return out


def _write_docs(folder: Path, docs: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True)
    for name, text in docs:
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def _read_docs(folder: Path) -> list[tuple[str, str]]:
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.txt"))]


def _chars(docs: list[tuple[str, str]]) -> int:
    return sum(len(t) for _, t in docs)


def source_of(name: str) -> str:
    """The source of a document name (``brown-00012-003`` -> ``brown``; mails are ``mail-...``)."""
    return name.split("-", 1)[0]


def load_sources() -> tuple[dict[str, list[str]], list[str]]:
    """The curated sources' documents and the mail bodies (200 characters or more, exact duplicates dropped, in
    the package's order)."""
    from moekit.lab.data.corpus import sotu_documents
    from moekit.lab.data.mail_text import mail_body_text
    from moekit.lab.data.text_sources import (
        brown_documents,
        moby_dick_documents,
        shakespeare_documents,
        spam_assassin_corpus,
    )

    curated = {"brown": brown_documents(), "sotu": sotu_documents(), "moby": moby_dick_documents(),
               "shakespeare": shakespeare_documents()}
    seen, bodies = set(), []
    for mail in spam_assassin_corpus():
        body = mail_body_text(mail.raw)
        if len(body) >= MIN_MAIL_CHARS and body not in seen:
            seen.add(body)
            bodies.append(body)
    return curated, bodies


def build_data(args: argparse.Namespace, data: Path, sources: tuple[dict[str, list[str]], list[str]] | None = None,
               ) -> dict[str, Any]:
    """Write the study's fixed data into ``data`` (positives, negatives, the mixed corpus, the held-out sets, the
    shared tokenizer, the classifier's scores) and return its manifest; ``sources``: the curated documents and
    mail bodies (None: read them from the registry packages)."""
    from moekit.lab.data.quality import QualityClassifier, roc_auc
    from moekit.lab.data.tokenizer import train_tokenizer

    curated, bodies = load_sources() if sources is None else sources
    rng = np.random.default_rng(args.data_seed)
    positives, pool, held = [], {}, {}
    for name, docs in curated.items():
        if name in POSITIVE_SOURCES:
            pos_ids, pool_ids, held_ids = _split(len(docs), (0.30, 0.55, 0.15), rng)
            positives += _pieces(name, docs, pos_ids)
        else:
            pool_ids, held_ids = _split(len(docs), (0.85, 0.15), rng)
        pool[name] = _pieces(name, docs, pool_ids)
        held[name] = _heldout(name, docs, held_ids, args.heldout_chars)
    if args.max_mails is not None:
        bodies = bodies[: args.max_mails]
    neg_ids, mail_pool_ids, mail_held_ids = _split(len(bodies), (0.35, 0.55, 0.10), rng)
    negatives = [(f"mail-{i:05d}", bodies[i]) for i in neg_ids]
    mail_pool = [(f"mail-{i:05d}", bodies[i]) for i in mail_pool_ids]
    held["mail"] = _heldout("mail", bodies, mail_held_ids, args.heldout_chars)
    mixed = []
    for name in curated:
        mixed += _take(pool[name], rng.permutation(len(pool[name])), args.curated_chars)
    curated_total = _chars(mixed)
    mixed += _take(mail_pool, rng.permutation(len(mail_pool)), curated_total)
    if _chars(mixed) < 2 * curated_total * 0.95:
        raise SystemExit(f"error: the mail pool holds too few characters for {curated_total:,} of curated text; "
                         "lower --curated-chars")

    tmp = data.with_name(data.name + ".partial")  # written whole, then renamed: a rerun never sees half the data
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_docs(tmp / "mixed", mixed)
    for name, docs in held.items():
        _write_docs(tmp / "heldout" / name, docs)
    tok = train_tokenizer([t for _, t in mixed], VOCAB)
    tok.save(str(tmp / "tokenizer.json"))
    log(f"fitting the quality classifier on {len(positives):,} curated pieces and {len(negatives):,} mail bodies")
    clf = QualityClassifier.fit([t for _, t in positives], [t for _, t in negatives])
    clf.save(tmp / "classifier")
    scores = clf.score([t for _, t in mixed])
    is_mail = np.array([source_of(n) == "mail" for n, _ in mixed])
    manifest = {
        "flags": {k: getattr(args, k) for k in DATA_KEYS},
        "positives": {"documents": len(positives), "chars": _chars(positives)},
        "negatives": {"documents": len(negatives), "chars": _chars(negatives)},
        "mail_bodies": len(bodies),
        "mixed": {"documents": len(mixed), "chars": _chars(mixed), "curated_chars": curated_total},
        "heldout": {name: {"documents": len(d), "chars": _chars(d)} for name, d in held.items()},
        "scores": {n: float(s) for (n, _), s in zip(mixed, scores, strict=True)},
        "auc_mixed": roc_auc(scores[~is_mail], scores[is_mail]),
        "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if data.exists():
        shutil.rmtree(data)
    tmp.rename(data)
    return manifest


def arm_corpora(data: Path, manifest: dict[str, Any], seeds: int) -> dict[tuple[str, int], Path]:
    """Each seed's filtered corpus and random subset (written once into ``data``), and the mixed corpus."""
    from moekit.lab.data.quality import keep_mask

    mixed = _read_docs(data / "mixed")
    scores = np.array([manifest["scores"][n] for n, _ in mixed])
    out: dict[tuple[str, int], Path] = {}
    for s in range(seeds):
        out["mixed", s] = data / "mixed"
        filtered_dir, random_dir = data / f"filtered-seed{s}", data / f"random-seed{s}"
        if not (filtered_dir.is_dir() and random_dir.is_dir()):
            for folder in (filtered_dir, random_dir):
                if folder.exists():
                    shutil.rmtree(folder)
            keep = keep_mask(scores, pareto_alpha=PARETO_ALPHA, seed=s)
            kept = [d for d, k in zip(mixed, keep, strict=True) if k]
            _write_docs(filtered_dir, kept)
            order = np.random.default_rng(1000 + s).permutation(len(mixed))
            _write_docs(random_dir, _take(mixed, order, _chars(kept)))
        out["filtered", s], out["random", s] = filtered_dir, random_dir
    return out


def training_tokens(corpus: Path, tokenizer: Path) -> int:
    """The tokens of ``corpus``'s training split as a run prepares it (default piece size and split)."""
    from moekit.lab.data.config import DataConfig
    from moekit.lab.data.corpus import load_corpus
    from moekit.lab.data.split import cut_pieces, split_pieces
    from moekit.lab.data.tokenizer import encode_pieces, load_tokenizer

    d = DataConfig()
    train, _ = split_pieces(cut_pieces(load_corpus(str(corpus)), d.piece_chars), d.val_fraction)
    return int(encode_pieces(load_tokenizer(tokenizer), train).size)


def run_training_tokens(run_dir: Path) -> int:
    """The tokens of the training split a finished run trained on (its own token file)."""
    from safetensors import safe_open

    from moekit.lab.training.tasks import TOKENS_FILE

    with safe_open(str(run_dir / TOKENS_FILE), framework="np") as f:
        return int(f.get_slice("train").get_shape()[0])


def corpus_makeup(corpus: Path) -> dict[str, int]:
    """Characters per source of a corpus folder."""
    out: dict[str, int] = {}
    for name, text in _read_docs(corpus):
        out[source_of(name)] = out.get(source_of(name), 0) + len(text)
    return out


# -- evaluation --------------------------------------------------------------------------------------------------


def heldout_bits(run_dir: str | Path, texts: list[str], batch_size: int = 16) -> dict[str, float]:
    """Cross-entropy of a run's newest valid checkpoint on ``texts`` (cut and encoded as the trainer prepares a
    corpus, end-of-text after each document): nats per token and bits per UTF-8 byte of the predicted tokens."""
    import torch

    from moekit.data.batches import eval_windows
    from moekit.errors import MoekitError
    from moekit.lab.data.split import cut_pieces
    from moekit.lab.data.tokenizer import EOT, encode_pieces, load_tokenizer
    from moekit.lab.training.run import load_run
    from moekit.training import checkpoint as ckpt

    run_config, _, model = load_run(run_dir)
    found = ckpt.latest_valid_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        raise MoekitError(f"no valid checkpoint in {run_dir}")
    path, blobs = found
    state = ckpt.load_checkpoint(blobs, model)
    tok = load_tokenizer(Path(run_dir) / "tokenizer.json")
    tokens = encode_pieces(tok, cut_pieces(texts, run_config.data.piece_chars))
    # Byte-level BPE: each character of a token's string stands for one byte; the end-of-text token for none.
    nbytes = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for s, i in tok.get_vocab().items():
        nbytes[i] = 0 if s == EOT else len(s)
    model.eval()
    total, n_tok, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in eval_windows(tokens, batch_size, run_config.data.seq_len, None):
            logits = model(inputs).logits_BTV.float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             targets.reshape(-1), reduction="sum"))
            n_tok += targets.numel()
            n_bytes += int(nbytes[targets.numpy()].sum())
    return {"step": state["step"], "tokens": n_tok, "bytes": n_bytes, "nats_per_token": total / n_tok,
            "bits_per_byte": total / math.log(2) / n_bytes}


def heldout_texts(data: Path) -> dict[str, list[str]]:
    """The texts of each held-out set; ``unseen`` is Moby Dick and Shakespeare together, ``classifier_sources``
    Brown and State of the Union together."""
    per = {name: [t for _, t in _read_docs(data / "heldout" / name)] for name in (*POSITIVE_SOURCES,
                                                                                 *UNSEEN_SOURCES, "mail")}
    return {"unseen": per["moby"] + per["shakespeare"], "moby": per["moby"], "shakespeare": per["shakespeare"],
            "classifier_sources": per["brown"] + per["sotu"], "mail": per["mail"]}


# -- the study ---------------------------------------------------------------------------------------------------


def overrides(corpus: Path, tokenizer: Path, seed: int, steps: int) -> list[str]:
    return [f"data.corpus='{corpus}'", f"data.tokenizer_file='{tokenizer}'", f"train.seed={seed}",
            f"train.max_steps={steps}", f"train.eval_every={steps}", "train.eval_batches='none'",
            f"train.checkpoint_every={steps}", "train.threads=1", "train.progress='off'"]


def prepare_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (an interval needs two paired differences)")
    if args.epochs <= 0:
        parser.error("--epochs must be positive")


def study(args: argparse.Namespace) -> dict:
    import torch

    runs = Path(args.runs)
    data = runs / "data"
    manifest_path = data / "manifest.json"
    flags = {k: getattr(args, k) for k in DATA_KEYS}
    if manifest_path.is_file() and json.loads(manifest_path.read_text())["flags"] == flags:
        log(f"reusing the data in {data}")
        manifest = json.loads(manifest_path.read_text())
    else:
        log(f"building the data into {data}")
        manifest = build_data(args, data)
    corpora = arm_corpora(data, manifest, args.seeds)
    tokenizer = data / "tokenizer.json"
    filtered_tokens = training_tokens(corpora["filtered", 0], tokenizer)
    steps = args.steps if args.steps is not None else max(1, round(args.epochs * filtered_tokens / TOKENS_PER_STEP))
    log(f"{steps} steps for every run ({args.epochs} epochs of seed 0's filtered corpus, "
        f"{filtered_tokens:,} training tokens); {len(ARMS) * args.seeds} runs, {args.jobs} at a time")
    keys = [(arm, s) for s in range(args.seeds) for arm in ARMS]
    jobs = [(str(runs / f"{arm}-seed{s}"), BASE, overrides(corpora[arm, s].resolve(), tokenizer.resolve(), s, steps))
            for arm, s in keys]
    done = run_all(jobs, None, args.jobs)
    torch.set_num_threads(max(1, args.jobs))
    texts = heldout_texts(data)
    rows = []
    for (arm, s), r in zip(keys, done, strict=True):
        makeup = corpus_makeup(corpora[arm, s])
        n_train = run_training_tokens(Path(r["run_dir"]))
        row = {"arm": arm, "seed": s, "steps": steps, "corpus_chars": sum(makeup.values()),
               "corpus_mail_chars": makeup.get("mail", 0), "training_tokens": n_train,
               "epochs": steps * TOKENS_PER_STEP / n_train,
               "own_val_loss": r["summary"]["final_val_loss"], "run_dir": r["run_dir"]}
        for name in HELDOUT_SETS:
            h = heldout_bits(r["run_dir"], texts[name])
            row[f"{name}_bits_per_byte"] = h["bits_per_byte"]
            row[f"{name}_tokens"] = h["tokens"]
        rows.append(row)
        log(f"{arm} seed {s}: unseen {row['unseen_bits_per_byte']:.4f} bits/byte")
    kept = {s: corpus_makeup(corpora["filtered", s]) for s in range(args.seeds)}
    mixed = corpus_makeup(corpora["mixed", 0])
    config = {k: v for k, v in vars(args).items() if k != "section"}
    config["steps"] = steps
    return {"config": config, "rows": rows, "data": {k: v for k, v in manifest.items() if k != "scores"},
            "classifier": classifier_report(manifest, _read_docs(data / "mixed")),
            "mixed_makeup": mixed, "kept_makeup": kept}


def classifier_report(manifest: dict[str, Any], mixed: list[tuple[str, str]]) -> dict[str, Any]:
    """Per source of the mixed corpus: documents, the median score, the share scoring 0.5 or more, and the expected
    share of characters the Pareto rule keeps."""
    from moekit.lab.data.quality import pareto_keep_probability

    out = {}
    for src in sorted({source_of(n) for n, _ in mixed}):
        docs = [(n, t) for n, t in mixed if source_of(n) == src]
        scores = np.array([manifest["scores"][n] for n, _ in docs])
        chars = np.array([len(t) for _, t in docs], dtype=np.float64)
        keep = pareto_keep_probability(scores, PARETO_ALPHA)
        out[src] = {"documents": len(docs), "median_score": float(np.median(scores)),
                    "share_above_half": float((scores >= 0.5).mean()),
                    "expected_kept_char_share": float((keep * chars).sum() / chars.sum())}
    return out


def analyse(result: dict) -> dict:
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows})
    bits = {(r["arm"], r["seed"], h): r[f"{h}_bits_per_byte"] for r in rows for h in HELDOUT_SETS}
    means = {(a, h): interval([bits[a, s, h] for s in seeds]) for a in ARMS for h in HELDOUT_SETS}
    sd = {(a, h): statistics.stdev([bits[a, s, h] for s in seeds]) for a in ARMS for h in HELDOUT_SETS}

    def paired(a: str, b: str, h: str) -> dict:
        d = [bits[a, s, h] - bits[b, s, h] for s in seeds]
        m, half = interval(d)
        return {"a": a, "b": b, "set": h, "mean": m, "half": half, "per_seed": d}

    claims = []
    for other, why in (("mixed", "the filtered corpus is better than the unfiltered one"),
                       ("random", "which documents are kept matters, not only how many")):
        c = paired("filtered", other, "unseen")
        claims.append({**c, "paper": f"negative ({why})", "verdict": verdict(c["mean"], c["half"], -1)})
    others = [paired(a, b, h) for h in HELDOUT_SETS for a, b in (("filtered", "mixed"), ("filtered", "random"),
                                                                 ("random", "mixed"))]
    per_arm = {a: {h: [bits[a, s, h] for s in seeds] for h in HELDOUT_SETS} for a in ARMS}
    epochs = {a: statistics.fmean(r["epochs"] for r in rows if r["arm"] == a) for a in ARMS}
    chars = {a: statistics.fmean(r["corpus_chars"] for r in rows if r["arm"] == a) for a in ARMS}
    mail = {a: statistics.fmean(r["corpus_mail_chars"] / r["corpus_chars"] for r in rows if r["arm"] == a)
            for a in ARMS}
    return {"seeds": seeds, "means": {f"{a}/{h}": v for (a, h), v in means.items()},
            "seed_sd": {f"{a}/{h}": v for (a, h), v in sd.items()}, "claims": claims, "differences": others,
            "bits": per_arm, "epochs": epochs, "chars": chars, "mail_share": mail}


SET_LABELS = {"unseen": "Moby Dick + Shakespeare", "moby": "Moby Dick", "shakespeare": "Shakespeare",
              "classifier_sources": "Brown + SOTU", "mail": "mail bodies"}


def render(result: dict, stats: dict) -> str:
    cfg, data = result["config"], result["data"]
    seeds = stats["seeds"]
    lines = [HEADING, "", "```sh", "python benchmarks/repro/quality_filter.py " + cfg["command"], "```", "",
             f"Classifier: fitted on {data['positives']['documents']:,} curated pieces (Brown and State of the "
             f"Union, {data['positives']['chars']:,} characters) against {data['negatives']['documents']:,} mail "
             f"bodies ({data['negatives']['chars']:,} characters; headers and markup removed). Mixed corpus: "
             f"{data['mixed']['documents']:,} documents, {data['mixed']['chars']:,} characters, half mail bodies. "
             f"AUC of the classifier's score on the mixed corpus (curated pieces against mail bodies, documents it "
             f"never saw): {data['auc_mixed']:.4f}.", "",
             "| source in the mixed corpus | documents | median score | share scoring >= 0.5 | expected share of "
             "characters kept (Pareto, alpha 9) |", "|---|---|---|---|---|"]
    for src, c in result["classifier"].items():
        lines.append(f"| {src} | {c['documents']} | {c['median_score']:.3f} | {c['share_above_half']:.3f} | "
                     f"{c['expected_kept_char_share']:.3f} |")
    lines += ["", f"{len(seeds)} seeds per arm, {cfg['steps']} steps of 16 x 128 tokens for every run; one shared "
              "tokenizer. Held-out bits per byte after the last step (mean and 95 % interval over seeds; the seed "
              "standard deviation is the noise of one run):", "",
              "| arm | corpus characters | mail share | epochs | " + " | ".join(SET_LABELS[h] for h in HELDOUT_SETS)
              + " | seed sd (Moby Dick + Shakespeare) |",
              "|---|---|---|---|" + "---|" * len(HELDOUT_SETS) + "---|"]
    for a in ARMS:
        cells = [f"{stats['means'][f'{a}/{h}'][0]:.4f} ± {stats['means'][f'{a}/{h}'][1]:.4f}" for h in HELDOUT_SETS]
        lines.append(f"| {a} | {stats['chars'][a]:,.0f} | {stats['mail_share'][a]:.3f} | {stats['epochs'][a]:.2f} | "
                     + " | ".join(cells) + f" | {stats['seed_sd'][f'{a}/unseen']:.4f} |")
    lines += ["", "The claims (paired by seed, first minus second, bits per byte on Moby Dick + Shakespeare, the "
              "sources the classifier never saw as positives):", "",
              "| difference | mean ± 95 % | paper's side | verdict |", "|---|---|---|---|"]
    for c in stats["claims"]:
        lines.append(f"| {c['a']} - {c['b']} | {c['mean']:+.4f} ± {c['half']:.4f} | {c['paper']} | {c['verdict']} |")
    lines += ["", "Every paired difference (no paper side outside the two claims):", "",
              "| held-out text | " + " | ".join(f"{a} - {b}" for a, b in (("filtered", "mixed"),
                                                                         ("filtered", "random"),
                                                                         ("random", "mixed"))) + " |",
              "|---|---|---|---|"]
    for h in HELDOUT_SETS:
        cells = [f"{d['mean']:+.4f} ± {d['half']:.4f}" for d in stats["differences"] if d["set"] == h]
        lines.append(f"| {SET_LABELS[h]} | " + " | ".join(cells) + " |")
    lines += ["", f"![held-out bits per byte per arm, and the paired differences]({PLOT})"]
    return wrap_markdown(lines) + "\n"


def plot(stats: dict, path: Path) -> None:
    """Left: each arm's held-out bits per byte on each held-out set; right: the paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = np.arange(len(HELDOUT_SETS))
    colours = {"mixed": "tab:gray", "filtered": "tab:green", "random": "tab:orange"}
    for k, a in enumerate(ARMS):
        ms = [stats["means"][f"{a}/{h}"] for h in HELDOUT_SETS]
        left.errorbar(xs + (k - 1) * 0.2, [m for m, _ in ms], yerr=[h for _, h in ms], fmt="o", capsize=3,
                      color=colours[a], label=f"{a} (mean, 95 % interval over seeds)")
    left.set_xticks(xs, [SET_LABELS[h] for h in HELDOUT_SETS], rotation=15)
    left.set_ylabel("held-out bits per byte")
    left.legend()
    pairs = (("filtered", "mixed", "tab:green"), ("filtered", "random", "tab:purple"),
             ("random", "mixed", "tab:orange"))
    for k, (a, b, colour) in enumerate(pairs):
        ds = [next(d for d in stats["differences"] if d["a"] == a and d["b"] == b and d["set"] == h)
              for h in HELDOUT_SETS]
        right.errorbar(xs + (k - 1) * 0.2, [d["mean"] for d in ds], yerr=[d["half"] for d in ds], fmt="o",
                       capsize=3, color=colour, label=f"{a} minus {b}, paired by seed (95 % interval)")
    right.axhline(0.0, color="black", lw=1)
    right.set_xticks(xs, [SET_LABELS[h] for h in HELDOUT_SETS], rotation=15)
    right.set_ylabel("difference in held-out bits per byte")
    right.set_title("below 0: the first arm is better (GLaM's side)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    stats = analyse(result)
    write_outputs(out, result, stats, render(result, stats), result["rows"])
    plot(stats, out / PLOT)


def parser() -> argparse.ArgumentParser:
    p = study_parser(__doc__, "runs/quality-filter", seeds=5, steps=None)
    p.add_argument("--epochs", type=float, default=3.0,
                   help="steps = this many epochs of seed 0's filtered corpus (unless --steps is given)")
    p.add_argument("--data-seed", type=int, default=0, help="the fixed split of documents into roles")
    p.add_argument("--curated-chars", type=int, default=400_000, help="pool characters taken from each curated source")
    p.add_argument("--heldout-chars", type=int, default=150_000, help="characters of each held-out source")
    p.add_argument("--max-mails", type=int, help="use only the first N mail bodies (a quick trial)")
    return p


def main(argv: list[str] | None = None) -> int:
    return study_main(parser(), argv, HEADING, study, lambda result, args: write(result, Path(args.out)),
                      prepare=prepare_args)


if __name__ == "__main__":
    sys.exit(main())
