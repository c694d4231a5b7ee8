"""Statistics on hand-made inputs, against numbers computed by hand (arithmetic in comments); the category rules are
tested in tests/lab/analysis/test_categories.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis.stats import (
    category_ids,
    chi2_sf,
    contingency,
    entropy_bits,
    expert_specialisation,
    hash_null,
    layer_agreement,
    load_matched_hash,
    load_stats,
    mi_permutation_test,
    miller_madow_mi_bits,
    mutual_information_bits,
    top_tokens,
)
from moekit.lab.analysis.categories import CATEGORIES


def test_chi2_sf_matches_closed_form():
    # For 1 degree of freedom, P(X >= x) = erfc(sqrt(x / 2)); for 2, exp(-x / 2).
    assert chi2_sf(4.0, 1) == pytest.approx(math.erfc(math.sqrt(2.0)), rel=1e-9)  # 0.0455003
    assert chi2_sf(3.0, 2) == pytest.approx(math.exp(-1.5), rel=1e-9)


def test_specialisation_hand_computed():
    # 10 tokens: 5 of category 0, then 5 of category 1; expert 0 gets tokens 0-3, expert 1 gets tokens 4-9.
    cats_N = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    ids_NK = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])[:, None]
    counts = contingency(ids_NK, cats_N, 2, 2)
    np.testing.assert_array_equal(counts, [[4, 0], [1, 5]])
    spec = expert_specialisation(counts, np.bincount(cats_N))
    np.testing.assert_allclose(spec.corpus_share_C, [0.5, 0.5])
    # Expert 0: n = 4, expected (2, 2): chi2 = (4-2)^2/2 + (0-2)^2/2 = 4, 1 dof, p = erfc(sqrt(2)) = 0.0455.
    # Expert 1: n = 6, expected (3, 3): chi2 = (1-3)^2/3 + (5-3)^2/3 = 8/3, p = erfc(sqrt(4/3)) = 0.1025.
    assert spec.dof == 1
    np.testing.assert_allclose(spec.chi2_E, [4.0, 8 / 3])
    np.testing.assert_allclose(spec.p_E, [math.erfc(math.sqrt(2)), math.erfc(math.sqrt(4 / 3))], rtol=1e-9)
    assert spec.p_E[0] == pytest.approx(0.0455003, abs=1e-6)
    # Enrichment = share / corpus share: expert 0 (1, 0) / 0.5 = (2, 0); expert 1 (1/6, 5/6) / 0.5 = (1/3, 5/3).
    np.testing.assert_allclose(spec.enrichment_EC, [[2.0, 0.0], [1 / 3, 5 / 3]])
    # MI: joint p = [[.4, 0], [.1, .5]], p(expert) = (.4, .6), p(cat) = (.5, .5):
    # .4 log2(.4/.2) + .1 log2(.1/.3) + .5 log2(.5/.3) = .4 - .158496 + .368483 = .609987 bits.
    assert mutual_information_bits(ids_NK[:, 0], cats_N) == pytest.approx(0.609987, abs=1e-6)
    mi, chance, p = mi_permutation_test(ids_NK[:, 0], cats_N, num_permutations=200, seed=0)
    assert mi == pytest.approx(0.609987, abs=1e-6) and chance < mi and 0 < p < 0.1


def test_every_choice_counts_in_the_contingency_table():
    # Top-2: token 0 (category 1) goes to experts 0 and 2; token 1 (category 0) to experts 2 and 1.
    counts = contingency(np.array([[0, 2], [2, 1]]), np.array([1, 0]), 3, 2)
    np.testing.assert_array_equal(counts, [[0, 1], [1, 0], [1, 1]])


def test_category_absent_from_corpus_takes_no_degree_of_freedom():
    spec = expert_specialisation(np.array([[3, 1, 0]]), np.array([6, 2, 0]))
    # q = (.75, .25, 0); expert matches the corpus exactly: chi2 = 0, p = 1, dof = 2 - 1 = 1.
    assert spec.dof == 1 and spec.chi2_E[0] == 0.0 and spec.p_E[0] == pytest.approx(1.0)
    assert np.isnan(spec.enrichment_EC[0, 2])


def test_load_stats_hand_computed():
    ids_NK = np.array([[0], [0], [1], [0]])
    kept_NK = np.array([[True], [True], [True], [False]])
    probs_NE = np.full((4, 2), 0.5, dtype=np.float32)
    s = load_stats(ids_NK, kept_NK, probs_NE, 2)
    assert s["chosen_per_expert"] == [3, 1] and s["kept_per_expert"] == [2, 1]
    assert s["share_per_expert"] == [0.75, 0.25]
    assert s["dropped_share"] == pytest.approx(0.25)  # 1 of 4 assignments
    assert s["dropped_share_per_expert"] == pytest.approx([1 / 3, 0.0])
    assert s["entropy"] == pytest.approx(math.log(2), rel=1e-6)  # uniform over 2 experts
    assert s["entropy_normalised"] == pytest.approx(1.0, rel=1e-6)


def test_top_tokens_counts_and_order():
    ids_NK = np.array([[0, 1], [1, 0], [0, 2], [2, 1]])
    token_ids_N = np.array([7, 7, 3, 7])
    # Expert 0 sees tokens 0, 1, 2 -> ids 7, 7, 3; expert 1 sees tokens 0, 1, 3 -> 7 three times.
    assert top_tokens(ids_NK, token_ids_N, 0) == [(7, 2), (3, 1)]
    assert top_tokens(ids_NK, token_ids_N, 1) == [(7, 3)]


def test_layer_agreement_hand_computed():
    # Layer a routes (0, 0, 1, 1), layer b (1, 1, 0, 0): a perfect relabelling.
    a = layer_agreement(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), 2, num_permutations=20)
    assert a["transitions"] == [[0, 2], [2, 0]]
    assert a["best_successor_share"] == 1.0  # every token follows its expert's usual successor
    assert a["chance_successor_share"] == 0.5  # the largest next-layer load, 2 of 4
    assert a["mutual_information_bits"] == pytest.approx(1.0)  # b is a function of a, H(b) = 1 bit


def test_category_ids_follow_the_category_order():
    np.testing.assert_array_equal(category_ids(["other", "whitespace"], CATEGORIES), [6, 0])


def test_load_matched_hash_keeps_the_loads_exactly_for_distinct_ids():
    # Ten distinct token ids; trained top-1 loads 6, 2, 0, 2. Laid end to end (one unit each) and cut at 6, 8, 8,
    # 10, every expert gets exactly its load, whatever the order; expert 2 (load 0) gets no id.
    tokens_N = np.arange(100, 110)
    top1_N = np.array([0, 0, 0, 0, 0, 0, 1, 1, 3, 3])
    for seed in range(5):
        hashed_N = load_matched_hash(tokens_N, top1_N, 4, np.random.default_rng(seed))
        assert np.bincount(hashed_N, minlength=4).tolist() == [6, 2, 0, 2]


def test_load_matched_hash_is_a_function_of_the_token_id():
    # Ids 5 (x3), 7 (x2), 9 (x4), 2 (x1); trained loads 6 and 4. Each id goes to one expert; a load can miss its
    # target only by the ids that straddle a cut (here at most one id of count <= 4).
    tokens_N = np.array([5, 7, 5, 9, 9, 2, 7, 9, 5, 9])
    top1_N = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    for seed in range(5):
        hashed_N = load_matched_hash(tokens_N, top1_N, 2, np.random.default_rng(seed))
        for t in (5, 7, 9, 2):
            assert len(set(hashed_N[tokens_N == t].tolist())) == 1
        assert abs(int((hashed_N == 0).sum()) - 6) <= 4


def test_hash_null_on_hand_made_routing():
    # 20 distinct ids, category = id parity, the trained router sends even ids to expert 0 and odd ones to 1:
    # MI = H(category) = 1 bit. A load-matched hash (10 ids per expert) recovers the parity split with
    # probability 2 / C(20, 10) = 1.1e-5 per draw, so every draw is below 1 bit and p = 1 / (1 + draws).
    tokens_N = np.arange(20)
    cat_N = tokens_N % 2
    out = hash_null(tokens_N, cat_N.copy(), cat_N, 2, draws=10, seed=0)
    assert mutual_information_bits(cat_N, cat_N) == pytest.approx(1.0) and entropy_bits(cat_N) == pytest.approx(1.0)
    assert out["mutual_information_bits"] < 1.0 and out["p_value"] == pytest.approx(1 / 11)
    assert out["max_load_deviation"] == 0.0 and out["draws"] == 10
    # A layer that sends everything to one expert: every hash does too, MI 0, loads exact.
    one = hash_null(tokens_N, np.zeros(20, dtype=np.int64), cat_N, 4, draws=3)
    assert one["mutual_information_bits"] == 0.0 and one["max_load_deviation"] == 0.0
    assert one["p_value"] == 1.0  # every hash ties the trained MI of 0


def test_entropy_bits_hand_computed():
    # shares 1/2, 1/4, 1/4: H = 0.5 + 0.5 + 0.5 = 1.5 bits
    assert entropy_bits(np.array([0, 0, 1, 2])) == pytest.approx(1.5)


def test_miller_madow_mi_hand_computed():
    # Independent labels a = 0 0 1 1, b = 0 1 0 1: plug-in MI 0; 4 cells, 2 values of a, 2 of b, N = 4:
    # correction (4 - 2 - 2 + 1) / (2 x 4 x ln 2) = 1 / 5.5452 = 0.180337 bits, so the estimate is -0.180337.
    a_N, b_N = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert mutual_information_bits(a_N, b_N) == pytest.approx(0.0, abs=1e-12)
    assert miller_madow_mi_bits(a_N, b_N) == pytest.approx(-1 / (8 * math.log(2)))
    # b a function of a (b = a): plug-in 1 bit; (2 - 2 - 2 + 1) = -1, so 1 + 0.180337: the Miller-Madow H(b).
    assert miller_madow_mi_bits(a_N, a_N) == pytest.approx(1 + 1 / (8 * math.log(2)))
    # a = 0 0 0 1 1 2 (N = 6), b = 0 0 1 1 1 0: joint counts (0,0) 2, (0,1) 1, (1,1) 2, (2,0) 1.
    # Plug-in: p_a = 1/2, 1/3, 1/6; p_b = 1/2, 1/2;
    # MI = 2/6 log2((2/6) / (1/4)) + 1/6 log2((1/6) / (1/4)) + 2/6 log2((2/6) / (1/6)) + 1/6 log2((1/6) / (1/12))
    #    = 0.138346 - 0.097494 + 0.333333 + 0.166667 = 0.540852 bits;
    # correction (4 - 3 - 2 + 1) = 0: the estimate equals the plug-in.
    a_N, b_N = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 0])
    assert mutual_information_bits(a_N, b_N) == pytest.approx(0.540852, abs=1e-6)
    assert miller_madow_mi_bits(a_N, b_N) == pytest.approx(mutual_information_bits(a_N, b_N))
    # Labels need not start at 0 or be contiguous: a = 7 7 900 900, b = 3 5 3 5 is the independent case again.
    assert miller_madow_mi_bits(np.array([7, 7, 900, 900]), np.array([3, 5, 3, 5])) == pytest.approx(
        -1 / (8 * math.log(2)))


def test_miller_madow_removes_most_of_the_plug_in_bias():
    # 200 labels of a, 4 of b, independent, N = 4,000 (20 per value of a): the plug-in MI is about
    # (200 - 1)(4 - 1) / (2 x 4000 x ln 2) = 0.1077 bits above its true value 0; the corrected one is near 0.
    rng = np.random.default_rng(0)
    a_N, b_N = rng.integers(0, 200, 4000), rng.integers(0, 4, 4000)
    assert mutual_information_bits(a_N, b_N) == pytest.approx(0.1077, abs=0.02)
    assert abs(miller_madow_mi_bits(a_N, b_N)) < 0.01
