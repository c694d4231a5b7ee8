"""GLaM's data-quality filter: a linear classifier that tells curated text from noisy text, and the rule that
keeps a document by its score.

GLaM (Du et al. 2022, section 3) trained "a linear classifier" with curated text (Wikipedia, books) as positives
and web pages as negatives, scored the web corpus with it and kept documents by the score, following GPT-3 (Brown et
al. 2020, appendix A). Here:

- **Features.** Hashed word n-grams (lower-cased ``\\w+`` words and punctuation runs) and character n-grams (case
  kept: ALL-CAPS mail headers and spam are a signal). A feature is a string such as ``"w2:of the"`` or
  ``"c4:the "``; its bucket is ``fnv1a_32(feature) % n_features``. FNV-1a (not Python's ``hash()``, which is salted
  per process) makes a saved classifier mean the same thing in every process and on every machine. Feature values
  are ``log(1 + count)``, and each document's vector is L2-normalised so long and short documents are comparable.
- **Model.** Logistic regression, fitted by L-BFGS in float64 on the sparse feature matrix, with an L2 penalty
  and balanced class weights (each class carries half the loss, so a 0.5 threshold means something when one side
  has more documents).
- **Selection.** A threshold on the score, or GPT-3's stochastic rule: keep a document when
  ``np.random.pareto(alpha) > 1 - score``. NumPy's ``pareto`` draws the Lomax (Pareto II) distribution,
  ``P(X > t) = (1 + t) ** -alpha``, so a document with score ``s`` is kept with probability ``(2 - s) ** -alpha``
  (:func:`pareto_keep_probability`). GPT-3 used ``alpha = 9``: score 1 is always kept, score 0.5 with
  probability 1.5**-9 = 0.026, score 0 with 2**-9 = 0.002. The draws come from ``numpy.random.default_rng(seed)``:
  the same seed and scores keep the same documents.
- **Storage.** ``classifier.json`` (format, config, metrics) and ``classifier.safetensors`` (``weight`` [n_features],
  ``bias`` [1]) in one directory, written to a temporary directory and renamed; never pickle.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from moekit.atomic import atomic_dir
from moekit.errors import ConfigError, MoekitError

__all__ = [
    "FNV_OFFSET",
    "FNV_PRIME",
    "fnv1a_32",
    "feature_bucket",
    "QualityConfig",
    "SparseFeatures",
    "featurize",
    "QualityClassifier",
    "QualityMetrics",
    "evaluate",
    "roc_auc",
    "split_holdout",
    "pareto_keep_probability",
    "keep_mask",
]

FORMAT = "moekit-quality-classifier-1"
CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"

# FNV-1a, 32 bits (Fowler, Noll, Vo): h = offset; for each unit: h = (h XOR unit) * prime mod 2**32.
FNV_OFFSET = 2166136261
FNV_PRIME = 16777619
_MASK32 = 0xFFFFFFFF
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def fnv1a_32(text: str) -> int:
    """FNV-1a (32 bits) over the string's Unicode code points.

    For ASCII text this is exactly the standard byte-wise FNV-1a, so the published test vectors hold
    (``fnv1a_32("a") == 0xE40C292C``, ``fnv1a_32("foobar") == 0xBF9CF968``). Using code points rather than UTF-8
    bytes lets :func:`featurize` hash every character n-gram of a document at once with NumPy.
    """
    h = FNV_OFFSET
    for ch in text:
        h = ((h ^ ord(ch)) * FNV_PRIME) & _MASK32
    return h


@lru_cache(maxsize=1 << 20)
def _cached_fnv(text: str) -> int:
    # Word n-grams repeat across documents; the cache turns most of them into one dict look-up. It is a pure
    # function of its argument, so the cache holds no state that could change a result.
    return fnv1a_32(text)


def feature_bucket(feature: str, n_features: int) -> int:
    """The bucket of one feature string, e.g. ``feature_bucket("w1:the", 2**18)``."""
    return fnv1a_32(feature) % n_features


@dataclass
class QualityConfig:
    """Features and fitting of the quality classifier.

    ``n_features``: hash buckets. ``word_ngrams`` / ``char_ngrams``: inclusive ``(min, max)`` n-gram orders
    (``(0, 0)`` turns a family off). ``max_chars``: only the first N characters of a document are featurised
    (bounds the cost of very long documents; the start of a document shows its kind). ``l2``: penalty on the
    weights, ``l2 / 2 * |w|^2`` added to the mean loss. ``max_iter``: L-BFGS iterations.
    """

    n_features: int = 1 << 18
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)
    max_chars: int = 8000
    l2: float = 1e-4
    max_iter: int = 150

    def __post_init__(self) -> None:
        self.word_ngrams = tuple(int(v) for v in self.word_ngrams)  # JSON gives lists
        self.char_ngrams = tuple(int(v) for v in self.char_ngrams)
        if not isinstance(self.n_features, int) or not 2 <= self.n_features <= 1 << 24:
            raise ConfigError(f"QualityConfig.n_features = {self.n_features!r}: must be an int in [2, 2**24]")
        for name in ("word_ngrams", "char_ngrams"):
            lo, hi = getattr(self, name)
            if not (lo == hi == 0 or 1 <= lo <= hi <= 8):
                raise ConfigError(f"QualityConfig.{name} = {(lo, hi)!r}: must be (0, 0) or 1 <= min <= max <= 8")
        if self.word_ngrams == (0, 0) and self.char_ngrams == (0, 0):
            raise ConfigError("QualityConfig: word_ngrams and char_ngrams are both (0, 0): no features")
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise ConfigError(f"QualityConfig.max_chars = {self.max_chars!r}: must be an int >= 1")
        if not (isinstance(self.l2, (int, float)) and math.isfinite(self.l2) and self.l2 >= 0):
            raise ConfigError(f"QualityConfig.l2 = {self.l2!r}: must be a finite number >= 0")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"QualityConfig.max_iter = {self.max_iter!r}: must be an int >= 1")


@dataclass
class SparseFeatures:
    """A CSR matrix [n_documents, n_features]: row ``i`` is ``indices/values[indptr[i]:indptr[i + 1]]``."""

    indptr: np.ndarray  # int64 [N + 1]
    indices: np.ndarray  # int64 [nnz], sorted within a row
    values: np.ndarray  # float64 [nnz]
    n_features: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def to_torch(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta": the product we use is stable
            return torch.sparse_csr_tensor(
                torch.from_numpy(self.indptr),
                torch.from_numpy(self.indices),
                torch.from_numpy(self.values),
                size=(self.n_rows, self.n_features),
                dtype=torch.float64,
            )


def _char_ngram_hashes(text: str, n: int) -> np.ndarray:
    """FNV-1a of ``f"c{n}:" + gram`` for every character n-gram of ``text``, all at once.

    FNV-1a is sequential, so the state after the constant prefix is computed once and each gram continues from it:
    the result equals ``fnv1a_32(f"c{n}:" + text[i:i + n])`` exactly (tested).
    """
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(cp) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.full(count, fnv1a_32(f"c{n}:"), dtype=np.uint64)
    for k in range(n):
        # h < 2**32 and the prime < 2**25: the product fits in uint64 before the mask.
        h = ((h ^ cp[k : k + count]) * np.uint64(FNV_PRIME)) & np.uint64(_MASK32)
    return h


def _document_hashes(text: str, config: QualityConfig) -> np.ndarray:
    text = text[: config.max_chars]
    parts = []
    lo, hi = config.word_ngrams
    if hi:
        words = _WORD_RE.findall(text.lower())
        for n in range(lo, hi + 1):
            grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)] if n > 1 else words
            if grams:
                parts.append(np.fromiter((_cached_fnv(f"w{n}:{g}") for g in grams), np.uint64, len(grams)))
    lo, hi = config.char_ngrams
    if hi:
        parts.extend(_char_ngram_hashes(text, n) for n in range(lo, hi + 1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def featurize(
    documents: Sequence[str],
    config: QualityConfig,
    progress: Callable[[int, int], None] | None = None,
) -> SparseFeatures:
    """The L2-normalised ``log(1 + count)`` hashed n-gram vectors of ``documents``. A document with no feature
    (empty text) is an all-zero row. ``progress(done, total)`` is called every 256 documents and at the end."""
    indptr = [0]
    idx_parts, val_parts = [], []
    total = len(documents)
    for i, doc in enumerate(documents):
        buckets = _document_hashes(doc, config) % np.uint64(config.n_features)
        uniq, counts = np.unique(buckets.astype(np.int64), return_counts=True)
        vals = np.log1p(counts.astype(np.float64))
        norm = np.sqrt((vals * vals).sum())
        if norm > 0:
            vals /= norm
        idx_parts.append(uniq)
        val_parts.append(vals)
        indptr.append(indptr[-1] + len(uniq))
        if progress is not None and ((i + 1) % 256 == 0 or i + 1 == total):
            progress(i + 1, total)
    return SparseFeatures(
        np.asarray(indptr, dtype=np.int64),
        np.concatenate(idx_parts) if idx_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=np.float64),
        config.n_features,
    )


@dataclass
class QualityMetrics:
    """Held-out quality of the classifier at ``threshold`` (positives = curated text)."""

    precision: float
    recall: float
    accuracy: float
    auc: float
    threshold: float
    n_positive: int
    n_negative: int

    def line(self) -> str:
        return (
            f"precision {self.precision:.4f}, recall {self.recall:.4f}, accuracy {self.accuracy:.4f}, "
            f"AUC {self.auc:.4f} at threshold {self.threshold} ({self.n_positive} positives, "
            f"{self.n_negative} negatives)"
        )


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting
    half (the Mann-Whitney U statistic divided by n_pos * n_neg), from average ranks."""
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    if n_pos == 0 or n_neg == 0:
        raise MoekitError("AUC needs at least one positive and one negative document")
    allv = np.concatenate([np.asarray(scores_pos, np.float64), np.asarray(scores_neg, np.float64)])
    order = np.argsort(allv, kind="stable")
    sorted_v = allv[order]
    ranks = np.empty(len(allv), dtype=np.float64)
    # Average rank (1-based) over each run of tied values.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], len(allv)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def evaluate(
    scores_pos: np.ndarray, scores_neg: np.ndarray, threshold: float = 0.5
) -> QualityMetrics:
    """Precision / recall / accuracy of "score >= threshold means curated", and the AUC."""
    scores_pos, scores_neg = np.asarray(scores_pos), np.asarray(scores_neg)
    tp = int((scores_pos >= threshold).sum())
    fp = int((scores_neg >= threshold).sum())
    tn = len(scores_neg) - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(scores_pos) if len(scores_pos) else 0.0
    accuracy = (tp + tn) / (len(scores_pos) + len(scores_neg))
    return QualityMetrics(
        precision, recall, accuracy, roc_auc(scores_pos, scores_neg), threshold, len(scores_pos), len(scores_neg)
    )


def split_holdout(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, holdout_ids)``: a seeded permutation of ``range(n)``, the last ``round(n * f)`` held out
    (at least one each side when ``n >= 2``)."""
    if not 0 < holdout_fraction < 1:
        raise ConfigError(f"holdout_fraction = {holdout_fraction!r}: must be in (0, 1)")
    if n < 2:
        raise MoekitError(f"need at least 2 documents of each class to hold some out, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(n * holdout_fraction)))
    return np.sort(perm[: n - k]), np.sort(perm[n - k :])


@dataclass
class QualityClassifier:
    """Logistic regression over hashed n-grams: ``score = sigmoid(x . weight + bias)``."""

    config: QualityConfig
    weight: np.ndarray  # float32 [n_features]
    bias: float
    metrics: dict[str, Any] = field(default_factory=dict)  # held-out metrics etc., saved with the classifier

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float32)
        if self.weight.shape != (self.config.n_features,):
            raise ConfigError(
                f"weight has shape {self.weight.shape}; expected ({self.config.n_features},) = (n_features,)"
            )
        if not np.isfinite(self.weight).all() or not math.isfinite(self.bias):
            raise ConfigError("classifier weights are not finite")

    @classmethod
    def fit(
        cls,
        positives: Sequence[str],
        negatives: Sequence[str],
        config: QualityConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> QualityClassifier:
        """Fit on ``positives`` (curated, label 1) and ``negatives`` (noisy, label 0). Deterministic: L-BFGS from
        zero weights on a fixed feature matrix has no randomness."""
        config = config or QualityConfig()
        if not positives or not negatives:
            raise MoekitError(
                f"the quality classifier needs positive and negative documents; got {len(positives)} positive and "
                f"{len(negatives)} negative"
            )
        feats = featurize(list(positives) + list(negatives), config, progress)
        y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
        # Balanced class weights: each class carries half of the loss whatever the counts.
        sample_w = torch.where(y > 0, 0.5 / len(positives), 0.5 / len(negatives)).double()
        X = feats.to_torch()
        XT = SparseFeatures(*_transpose(feats), n_features=feats.n_rows).to_torch()
        w = torch.zeros(config.n_features, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=config.max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-9, tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            # The gradient is written by hand: X^T (p - y) needs no autograd through the sparse product.
            with torch.no_grad():
                z = torch.mv(X, w) + b
                # softplus(z) - y z is the logistic loss, stable for any z.
                loss = (sample_w * (torch.nn.functional.softplus(z) - y * z)).sum() + 0.5 * config.l2 * (w @ w)
                r = sample_w * (torch.sigmoid(z) - y)
                w.grad = torch.mv(XT, r) + config.l2 * w
                b.grad = r.sum().reshape(1)
            return loss

        opt.step(closure)
        return cls(config, w.detach().numpy().astype(np.float32), float(b.detach()[0]))

    def decision(self, documents: Sequence[str], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The logits ``x . weight + bias`` (float64 [N]); ``-inf`` for a blank document (only whitespace).
        Documents are featurised in chunks of 4,096 so memory stays bounded on a large corpus."""
        out = np.empty(len(documents), dtype=np.float64)
        chunk = 4096
        for start in range(0, len(documents), chunk):
            docs = documents[start : start + chunk]
            sub = None if progress is None else (lambda done, _total, s=start: progress(s + done, len(documents)))
            feats = featurize(docs, self.config, sub)
            contrib = feats.values * self.weight[feats.indices].astype(np.float64)
            counts = np.diff(feats.indptr)
            rows = np.repeat(np.arange(feats.n_rows), counts)
            z = np.bincount(rows, weights=contrib, minlength=feats.n_rows) + self.bias
            # A blank document would otherwise get about sigmoid(bias), a number about the class balance, not
            # about the text: it has nothing curated in it, so it scores 0.
            blank = np.fromiter((not d.strip() for d in docs), bool, len(docs)) | (counts == 0)
            out[start : start + len(docs)] = np.where(blank, -np.inf, z)
        return out

    def score(self, documents: Sequence[str], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """P(curated) of each document, in [0, 1] (float64 [N]); 0 for a blank document."""
        z = self.decision(documents, progress)
        # Stable sigmoid written with exp of a non-positive number only (exp(-inf) = 0 gives 0 for blanks).
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def save(self, path: str | Path) -> Path:
        """Write ``classifier.json`` and ``classifier.safetensors`` into the directory ``path`` (created; an
        existing one is replaced only after the new one is fully written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path) as tmp:
            meta = {"format": FORMAT, "config": asdict(self.config), "bias": self.bias, "metrics": self.metrics}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            np_save_file(
                {"weight": self.weight, "bias": np.asarray([self.bias], dtype=np.float64)}, str(tmp / WEIGHTS_FILE)
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        path = Path(path)
        cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise MoekitError(f"{path} is not a saved quality classifier (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
            tensors = np_load_file(str(w_path))
        except Exception as exc:  # JSON, UTF-8 and safetensors each raise their own type
            raise MoekitError(f"cannot read the quality classifier in {path}: {exc}") from None
        if meta.get("format") != FORMAT:
            raise MoekitError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if "weight" not in tensors or "bias" not in tensors:
            raise MoekitError(f"{w_path} lacks the 'weight' or 'bias' tensor")
        return cls(QualityConfig(**meta["config"]), tensors["weight"], float(tensors["bias"][0]),
                   meta.get("metrics", {}))


def _transpose(f: SparseFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of the transpose (the columns of ``f`` become rows), for ``X^T r`` as a row-parallel product."""
    rows = np.repeat(np.arange(f.n_rows, dtype=np.int64), np.diff(f.indptr))
    order = np.argsort(f.indices, kind="stable")  # stable: row indices stay sorted within each new row
    counts = np.bincount(f.indices, minlength=f.n_features)
    indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
    return indptr, rows[order], f.values[order]


def pareto_keep_probability(scores: np.ndarray, alpha: float) -> np.ndarray:
    """P(keep) under the GPT-3 rule for each score: ``P(Lomax(alpha) > 1 - s) = (2 - s) ** -alpha``."""
    return np.power(2.0 - np.asarray(scores, dtype=np.float64), -float(alpha))


def keep_mask(
    scores: np.ndarray, *, threshold: float | None = None, pareto_alpha: float | None = None, seed: int = 0
) -> np.ndarray:
    """Which documents to keep: ``score >= threshold``, or GPT-3's ``rng.pareto(alpha) > 1 - score`` with
    ``rng = numpy.random.default_rng(seed)`` (one draw per document, in order). Exactly one rule must be given."""
    scores = np.asarray(scores, dtype=np.float64)
    if (threshold is None) == (pareto_alpha is None):
        raise ConfigError("give exactly one of threshold or pareto_alpha")
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold = {threshold!r}: must be in [0, 1]")
        return scores >= threshold
    if not (math.isfinite(pareto_alpha) and pareto_alpha > 0):
        raise ConfigError(f"pareto_alpha = {pareto_alpha!r}: must be a finite number > 0 (GPT-3 used 9)")
    draws = np.random.default_rng(seed).pareto(pareto_alpha, size=len(scores))
    return draws > 1.0 - scores
