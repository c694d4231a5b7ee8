"""The GLaM quality classifier: stable hashing (golden values), separation of a hand-made clean/noisy fixture,
save/load, the AUC and precision/recall arithmetic, and the Pareto keep rule against its closed form."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from moekit.errors import MoekitError
from moekit.lab.data.quality import (
    FNV_OFFSET,
    QualityClassifier,
    QualityConfig,
    _char_ngram_hashes,
    evaluate,
    feature_bucket,
    featurize,
    fnv1a_32,
    keep_mask,
    pareto_keep_probability,
    roc_auc,
    split_holdout,
)

SMALL = QualityConfig(n_features=1 << 12, char_ngrams=(3, 4), max_iter=60)

# ---------------------------------------------------------------------------------------------------------------
# A hand-made fixture: clean prose sentences against noisy mail-like text (headers, markup, shouting, addresses).
_NOUNS = "river city council harvest winter letter village teacher history garden law market".split()
_VERBS = "crossed described admired rebuilt remembered praised studied visited".split()
_ADJ = "quiet ancient northern careful generous modest narrow".split()


def clean_doc(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(4, 7)):
        sents.append(
            f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)} "
            f"of the {rng.choice(_ADJ)} {rng.choice(_NOUNS)}."
        )
    return " ".join(sents)


def noisy_doc(rng: random.Random) -> str:
    n = rng.randint(1000, 9999)
    return (
        f"Received: from mx{n}.example.net ([10.0.{n % 256}.1]) by smtp{n % 7}.example.com\n"
        f"Message-Id: <{n}.{rng.randint(0, 99999)}@example.net>\nContent-Type: text/html; charset=iso-8859-1\n\n"
        f"<html><body><FONT SIZE=3D2>CLICK HERE!!! ${rng.randint(10, 999)}.00 FREE "
        f"{rng.choice(['VIAGRA', 'MORTGAGE', 'CASINO'])} =20</FONT><a href=3D\"http://x{n}.biz/?id=3D{n}\">"
        f"unsubscribe</a></body></html>"
    )


def fixture(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    return [clean_doc(rng) for _ in range(n)], [noisy_doc(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def test_fnv1a_golden_values_computed_by_hand():
    # Empty string: no step, the offset basis 2166136261 (0x811C9DC5).
    assert fnv1a_32("") == FNV_OFFSET == 2166136261
    # "a" (0x61): 0x811C9DC5 XOR 0x61 = 0x811C9DA4 = 2166136228; times the prime 16777619 gives
    # 36342608335481132, and 36342608335481132 mod 2**32 = 3826002220 = 0xE40C292C (the FNV reference vector).
    assert fnv1a_32("a") == 3826002220 == 0xE40C292C
    # The published FNV-1a 32-bit test vector for "foobar".
    assert fnv1a_32("foobar") == 0xBF9CF968


def test_bucket_indices_are_golden():
    # 0xE40C292C mod 1024 keeps the low 10 bits: 0x92C & 0x3FF = 0x12C = 300.
    assert feature_bucket("a", 1024) == 300
    # 0xBF9CF968 mod 2**18 keeps the low 18 bits: 0xCF968 & 0x3FFFF = 0xF968 = 63848.
    assert feature_bucket("foobar", 1 << 18) == 63848
    # A non-power-of-two size is a plain remainder: 3826002220 = 1000 * 3826002 + 220.
    assert feature_bucket("a", 1000) == 220


def test_vectorised_char_ngrams_equal_the_scalar_hash():
    text = "Naïve café — ∑ x² 日本語\tOK"
    for n in (1, 3, 5):
        got = _char_ngram_hashes(text, n)
        want = [fnv1a_32(f"c{n}:" + text[i : i + n]) for i in range(len(text) - n + 1)]
        assert got.tolist() == want
    assert len(_char_ngram_hashes("ab", 3)) == 0


def test_featurize_golden_row():
    # Words only, unigrams: "b a b" -> features w1:b (twice) and w1:a (once); values log(1 + count), L2-normalised.
    cfg = QualityConfig(n_features=1 << 12, word_ngrams=(1, 1), char_ngrams=(0, 0))
    f = featurize(["b a b"], cfg)
    ia, ib = fnv1a_32("w1:a") % 4096, fnv1a_32("w1:b") % 4096
    row = dict(zip(f.indices.tolist(), f.values.tolist(), strict=True))
    norm = math.sqrt(math.log(2) ** 2 + math.log(3) ** 2)
    assert row == pytest.approx({ia: math.log(2) / norm, ib: math.log(3) / norm})
    # An empty document is an all-zero row, not an error.
    assert featurize([""], cfg).indptr.tolist() == [0, 0]


def test_feature_indices_are_the_same_in_a_fresh_process_with_another_hash_seed():
    docs = ["Hello, world: the quick brown fox.", "Received: from mx1.example.net"]
    here = featurize(docs, SMALL).indices.tolist()
    code = (
        "import json; from moekit.lab.data.quality import featurize, QualityConfig; "
        "c = QualityConfig(n_features=1 << 12, char_ngrams=(3, 4), max_iter=60); "
        f"print(json.dumps(featurize({docs!r}, c).indices.tolist()))"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here


# ---------------------------------------------------------------------------------------------------------------
# The classifier


def test_classifier_separates_clean_from_noisy_held_out():
    pos, neg = fixture(40, seed=0)
    clf = QualityClassifier.fit(pos[:30], neg[:30], SMALL)
    sp, sn = clf.score(pos[30:]), clf.score(neg[30:])
    assert ((0 <= sp) & (sp <= 1)).all() and ((0 <= sn) & (sn <= 1)).all()
    m = evaluate(sp, sn)
    assert m.auc == 1.0 and m.precision == 1.0 and m.recall == 1.0
    assert sp.min() > 0.5 > sn.max()
    # Fresh documents from another seed, never seen: still separated.
    pos2, neg2 = fixture(10, seed=99)
    assert roc_auc(clf.score(pos2), clf.score(neg2)) == 1.0
    # A blank document has no feature: it scores 0 rather than sigmoid(bias).
    assert clf.score(["", "   \n"]).tolist() == [0.0, 0.0]


def test_fit_is_deterministic_and_save_load_round_trips(tmp_path):
    pos, neg = fixture(20, seed=1)
    a = QualityClassifier.fit(pos, neg, SMALL)
    b = QualityClassifier.fit(pos, neg, SMALL)
    np.testing.assert_array_equal(a.weight, b.weight)
    a.metrics = {"auc": 1.0}
    path = a.save(tmp_path / "clf")
    assert sorted(p.name for p in path.iterdir()) == ["classifier.json", "classifier.safetensors"]
    c = QualityClassifier.load(path)
    assert c.config == a.config and c.metrics == {"auc": 1.0} and c.bias == a.bias
    np.testing.assert_array_equal(c.score(pos + neg), a.score(pos + neg))
    # Saving over an existing classifier replaces it; no temporary directory is left behind.
    a.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]


def test_scoring_in_chunks_matches_one_by_one_and_reports_progress():
    pos, neg = fixture(10, seed=4)
    clf = QualityClassifier.fit(pos, neg, SMALL)
    docs = (pos + neg) * 206  # 4,120 documents: two chunks of 4,096 and 24
    seen = []
    scores = clf.score(docs, progress=lambda done, total: seen.append((done, total)))
    one = clf.score(pos + neg)
    np.testing.assert_array_equal(scores, np.tile(one, 206))
    assert seen[-1] == (4120, 4120) and (4096, 4120) in seen


def test_load_errors(tmp_path):
    with pytest.raises(MoekitError, match="not a saved quality classifier"):
        QualityClassifier.load(tmp_path)
    pos, neg = fixture(5, seed=2)
    path = QualityClassifier.fit(pos, neg, SMALL).save(tmp_path / "clf")
    meta = json.loads((path / "classifier.json").read_text())
    meta["format"] = "something-else"
    (path / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(MoekitError, match="format"):
        QualityClassifier.load(path)
    (path / "classifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(MoekitError, match="cannot read"):
        QualityClassifier.load(path)


def test_fit_needs_both_classes():
    with pytest.raises(MoekitError, match="positive and negative"):
        QualityClassifier.fit(["some text"], [], SMALL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_features": 1}, "n_features"),
        ({"word_ngrams": (2, 1)}, "word_ngrams"),
        ({"word_ngrams": (0, 0), "char_ngrams": (0, 0)}, "no features"),
        ({"max_chars": 0}, "max_chars"),
        ({"l2": float("nan")}, "l2"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QualityConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_auc_and_precision_recall_by_hand():
    # Pairs (pos, neg): (0.9, 0.5) right, (0.9, 0.1) right, (0.4, 0.5) wrong, (0.4, 0.1) right: AUC = 3/4.
    assert roc_auc(np.array([0.9, 0.4]), np.array([0.5, 0.1])) == 0.75
    # A tie counts half.
    assert roc_auc(np.array([0.5]), np.array([0.5])) == 0.5
    # At threshold 0.5: positives 0.9 kept, 0.4 not (TP 1, FN 1); negatives 0.5 kept (FP 1), 0.1 not (TN 1).
    m = evaluate(np.array([0.9, 0.4]), np.array([0.5, 0.1]), threshold=0.5)
    assert (m.precision, m.recall, m.accuracy) == (0.5, 0.5, 0.5)


def test_split_holdout_is_seeded_and_disjoint():
    tr, te = split_holdout(10, 0.2, seed=3)
    assert len(te) == 2 and sorted(tr.tolist() + te.tolist()) == list(range(10))
    tr2, te2 = split_holdout(10, 0.2, seed=3)
    assert te.tolist() == te2.tolist()
    with pytest.raises(MoekitError):
        split_holdout(1, 0.2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Selection


def test_pareto_keep_probability_closed_form():
    # numpy's pareto is Lomax: P(X > t) = (1 + t) ** -alpha, so P(keep | s) = (2 - s) ** -alpha.
    p = pareto_keep_probability(np.array([1.0, 0.5, 0.0]), 9.0)
    assert p.tolist() == pytest.approx([1.0, 1.5**-9, 2.0**-9])  # 1, 0.026012..., 1/512


@pytest.mark.parametrize("score, expected", [(0.5, 1.5**-9), (0.0, 2.0**-9), (0.9, 1.1**-9)])
def test_pareto_rule_keeps_the_expected_share(score, expected):
    # Share kept of N documents with equal scores is Binomial(N, p) / N with p = (2 - s) ** -9:
    # s = 0.5: p = 1 / 1.5**9 = 1 / 38.443 = 0.026012; s = 0: p = 1 / 512 = 0.001953; s = 0.9: p = 1 / 2.3579 = 0.4241.
    # With N = 100,000 the standard deviation of the share is sqrt(p (1 - p) / N) <= 0.0016; allow 4 of them.
    n = 100_000
    keep = keep_mask(np.full(n, score), pareto_alpha=9.0, seed=0)
    sd = math.sqrt(expected * (1 - expected) / n)
    assert abs(keep.mean() - expected) < 4 * sd


def test_pareto_rule_is_reproducible_by_seed_and_monotone_in_the_score():
    scores = np.random.default_rng(5).random(2000)
    a = keep_mask(scores, pareto_alpha=9.0, seed=7)
    np.testing.assert_array_equal(a, keep_mask(scores, pareto_alpha=9.0, seed=7))
    assert not np.array_equal(a, keep_mask(scores, pareto_alpha=9.0, seed=8))
    # Score 1: every draw (> 0) exceeds 1 - 1 = 0, always kept.
    assert keep_mask(np.ones(1000), pareto_alpha=9.0, seed=0).all()
    # A larger alpha keeps fewer low-score documents.
    low = np.full(10_000, 0.3)
    assert keep_mask(low, pareto_alpha=9.0, seed=0).sum() < keep_mask(low, pareto_alpha=2.0, seed=0).sum()


def test_threshold_rule_and_bad_rules():
    s = np.array([0.2, 0.5, 0.7])
    assert keep_mask(s, threshold=0.5).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="exactly one"):
        keep_mask(s)
    with pytest.raises(ValueError, match="exactly one"):
        keep_mask(s, threshold=0.5, pareto_alpha=9.0)
    with pytest.raises(ValueError, match="pareto_alpha"):
        keep_mask(s, pareto_alpha=0.0)
    with pytest.raises(ValueError, match="threshold"):
        keep_mask(s, threshold=1.5)
