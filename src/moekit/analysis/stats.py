"""Statistics of a routing trace: expert load, drops, router entropy, top tokens, category specialisation with a
significance score, and routing agreement between consecutive MoE layers.

Pure numpy on the arrays of :class:`moekit.analysis.trace.RoutingTrace` (or plain arrays), so each number can be
checked by hand on a small example (tests do).

Specialisation, the ST-MoE question "does expert e see a different mix of token kinds than the corpus?":
for expert e with n_e routed tokens (all its router choices, kept or dropped: the router's preference is what is
being measured) and observed category counts O_ec, the expected counts under "no specialisation" are
n_e * q_c with q_c the corpus share of category c. Pearson's goodness-of-fit statistic
``chi2_e = sum_c (O_ec - n_e q_c)^2 / (n_e q_c)`` has C' - 1 degrees of freedom (C' = categories present in the
corpus); its p-value is the chi-square survival function (``torch.special.gammaincc``, no SciPy needed). The
per-cell ``enrichment = share_ec / q_c`` says in which direction. Per layer, the mutual information between the
top-1 expert and the category, in bits, is compared with the same statistic after shuffling the expert labels
(a permutation baseline: what chance alone gives at this sample size).

Shuffling the expert labels only tests independence: any router that depends on the token at all beats it, since
the category is (nearly) a function of the token id. Two stronger null models answer "more than a router that
just follows the token?": the same statistic for the untrained model (computed by the caller from its own trace),
and :func:`load_matched_hash`, a random map from token id to expert whose token-weighted loads are the trained
layer's (:func:`hash_null`: its MI over several draws).

The plug-in MI is biased upwards on a finite sample, the more so the more cells of the joint table are occupied;
:func:`miller_madow_mi_bits` subtracts the first-order bias, for comparisons between labelings whose spreads differ.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Specialisation",
    "chi2_sf",
    "contingency",
    "entropy_bits",
    "expert_specialisation",
    "hash_null",
    "layer_agreement",
    "load_matched_hash",
    "load_stats",
    "miller_madow_mi_bits",
    "mutual_information_bits",
    "mi_permutation_test",
    "top_tokens",
]


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof): the regularised upper incomplete gamma Q(dof/2, stat/2)."""
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def contingency(
    expert_ids_NK: np.ndarray, categories_N: np.ndarray, num_experts: int, num_categories: int
) -> np.ndarray:
    """int64 ``[E, C]``: how many (token, choice) pairs of category c went to expert e (every choice counts)."""
    N, K = expert_ids_NK.shape
    cats_NK = np.repeat(np.asarray(categories_N, dtype=np.int64)[:, None], K, axis=1)
    counts = np.zeros((num_experts, num_categories), dtype=np.int64)
    np.add.at(counts, (expert_ids_NK.reshape(-1), cats_NK.reshape(-1)), 1)
    return counts


@dataclass
class Specialisation:
    """Per-expert category mix against the corpus mix (see the module docstring).

    Attributes:
        counts_EC: observed counts per expert and category.
        corpus_share_C: q_c, the share of each category among all analysed tokens.
        share_EC: O_ec / n_e (0 for an expert that saw no token).
        enrichment_EC: share_ec / q_c (nan where q_c = 0).
        chi2_E, dof, p_E: Pearson goodness-of-fit statistic, degrees of freedom, p-value per expert.
    """

    counts_EC: np.ndarray
    corpus_share_C: np.ndarray
    share_EC: np.ndarray
    enrichment_EC: np.ndarray
    chi2_E: np.ndarray
    dof: int
    p_E: np.ndarray


def expert_specialisation(counts_EC: np.ndarray, corpus_counts_C: np.ndarray) -> Specialisation:
    """Goodness-of-fit of each expert's category counts against the corpus category shares."""
    counts_EC = np.asarray(counts_EC, dtype=np.int64)
    corpus = np.asarray(corpus_counts_C, dtype=np.float64)
    q_C = corpus / corpus.sum()
    present_C = q_C > 0
    n_E = counts_EC.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share_EC = np.where(n_E[:, None] > 0, counts_EC / np.maximum(n_E[:, None], 1), 0.0)
        enrichment_EC = np.where(present_C[None, :], share_EC / np.where(present_C, q_C, 1.0)[None, :], np.nan)
    expected_EC = n_E[:, None] * q_C[None, :]
    dof = int(present_C.sum()) - 1
    chi2_E = np.zeros(counts_EC.shape[0])
    p_E = np.ones(counts_EC.shape[0])
    for e in range(counts_EC.shape[0]):
        if n_E[e] == 0:
            continue
        diff = counts_EC[e, present_C] - expected_EC[e, present_C]
        chi2_E[e] = float((diff**2 / expected_EC[e, present_C]).sum())
        p_E[e] = chi2_sf(chi2_E[e], dof)
    return Specialisation(counts_EC, q_C, share_EC, enrichment_EC, chi2_E, dof, p_E)


def mutual_information_bits(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """I(A; B) in bits from paired integer labels (plug-in estimate from the joint counts)."""
    a_N = np.asarray(a_N, dtype=np.int64)
    b_N = np.asarray(b_N, dtype=np.int64)
    joint = np.zeros((int(a_N.max()) + 1, int(b_N.max()) + 1), dtype=np.float64)
    np.add.at(joint, (a_N, b_N), 1.0)
    p = joint / joint.sum()
    pa = p.sum(axis=1, keepdims=True)
    pb = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pa @ pb)[nz])).sum())


def miller_madow_mi_bits(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """I(A; B) in bits with the Miller-Madow correction of each of its three entropies: the plug-in estimate
    (:func:`mutual_information_bits`) minus ``(B_AB - B_A - B_B + 1) / (2 N ln 2)``, where ``B_X`` is the number of
    distinct values (non-empty bins) of X in the sample and ``N`` its size.

    The plug-in MI is biased upwards, by about that amount (the first-order bias of a plug-in entropy is
    ``-(B - 1) / (2 N ln 2)`` bits): a value of A seen once always looks fully determined. The bias grows with the
    number of occupied cells, so two labelings of the same A with different spreads over B are biased differently
    and their plug-in difference is too. When B is a function of A (``B_AB = B_A``) the correction is that of
    H(B) alone. The corrected value is an estimate and can be slightly negative for independent labels; with many
    values of A seen only once or twice it still under-corrects."""
    a_N = np.asarray(a_N, dtype=np.int64)
    b_N = np.asarray(b_N, dtype=np.int64)
    n = len(a_N)
    cells = len(np.unique(a_N * (int(b_N.max()) + 1) + b_N))
    bins = cells - len(np.unique(a_N)) - len(np.unique(b_N)) + 1
    return float(mutual_information_bits(a_N, b_N) - bins / (2.0 * n * np.log(2.0)))


def mi_permutation_test(a_N: np.ndarray, b_N: np.ndarray, num_permutations: int = 200,
                        seed: int = 0) -> tuple[float, float, float]:
    """``(mi, chance_mean, p)``: the observed MI (bits), its mean with ``a`` shuffled, and the permutation p-value
    ``(1 + #{perm >= observed}) / (1 + num_permutations)``. The plug-in MI is biased upwards on finite samples;
    the shuffled mean is that bias, so ``mi - chance_mean`` is the information beyond chance."""
    rng = np.random.default_rng(seed)
    observed = mutual_information_bits(a_N, b_N)
    perms = np.array([mutual_information_bits(rng.permutation(a_N), b_N) for _ in range(num_permutations)])
    p = (1 + int((perms >= observed - 1e-12).sum())) / (1 + num_permutations)
    return observed, float(perms.mean()), p


def load_stats(expert_ids_NK: np.ndarray, kept_NK: np.ndarray, probs_NE: np.ndarray, num_experts: int) -> dict:
    """One layer's load: assignments chosen and kept per expert, drop shares, router entropy.

    ``entropy`` is the mean over tokens of ``-sum p log p`` (nats); ``entropy_normalised`` divides by log E
    (1 = uniform router, 0 = certain)."""
    chosen_E = np.bincount(expert_ids_NK.reshape(-1), minlength=num_experts)
    kept_E = np.bincount(expert_ids_NK[kept_NK], minlength=num_experts)
    total = int(chosen_E.sum())
    p = np.clip(probs_NE.astype(np.float64), 1e-30, 1.0)
    entropy = float((-(probs_NE * np.log(p)).sum(axis=1)).mean())
    return {
        "chosen_per_expert": chosen_E.tolist(),
        "kept_per_expert": kept_E.tolist(),
        "share_per_expert": (chosen_E / max(total, 1)).tolist(),
        "dropped_share": float(1.0 - kept_E.sum() / max(total, 1)),
        "dropped_share_per_expert": [float(1 - k / c) if c else 0.0 for k, c in zip(kept_E, chosen_E, strict=True)],
        "tokens_fully_dropped_share": float((~kept_NK.any(axis=1)).mean()),
        "entropy": entropy,
        "entropy_normalised": float(entropy / np.log(num_experts)) if num_experts > 1 else 0.0,
        "mean_top1_prob": float(probs_NE.max(axis=1).mean()),
    }


def top_tokens(expert_ids_NK: np.ndarray, token_ids_N: np.ndarray, expert: int, n: int = 10) -> list[tuple[int, int]]:
    """The ``n`` token ids routed to ``expert`` most often (any choice rank), with counts, most frequent first
    (ties by token id, so the list is deterministic)."""
    mask_N = (expert_ids_NK == expert).any(axis=1)
    counts = Counter(int(t) for t in token_ids_N[mask_N])
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def layer_agreement(top1_a_N: np.ndarray, top1_b_N: np.ndarray, num_experts: int,
                    num_permutations: int = 100, seed: int = 0) -> dict:
    """How predictable a token's top-1 expert in the next MoE layer is from its top-1 expert in this one.

    Experts of different layers are not aligned (expert 3 here has nothing to do with expert 3 there), so "same
    id" is meaningless; instead: the transition matrix ``M[e, e']`` (row-normalised), the share of tokens that
    follow their expert's most common successor (``best_successor_share``) against its value if the layers routed
    independently with the same loads (``chance_successor_share`` = the largest next-layer load), and the mutual
    information (bits) against a permutation baseline."""
    M = np.zeros((num_experts, num_experts), dtype=np.int64)
    np.add.at(M, (top1_a_N, top1_b_N), 1)
    N = max(int(M.sum()), 1)
    best = float(M.max(axis=1).sum() / N)
    chance = float(M.sum(axis=0).max() / N)
    mi, mi_chance, p = mi_permutation_test(top1_a_N, top1_b_N, num_permutations, seed)
    rows = M.sum(axis=1, keepdims=True)
    return {
        "transitions": M.tolist(),
        "transition_share": (M / np.maximum(rows, 1)).tolist(),
        "best_successor_share": best,
        "chance_successor_share": chance,
        "mutual_information_bits": mi,
        "mutual_information_chance_bits": mi_chance,
        "p_value": p,
    }


def category_ids(categories: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Category names -> indices into ``names``."""
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[c] for c in categories], dtype=np.int64)


def entropy_bits(labels_N: np.ndarray) -> float:
    """H(labels) in bits (plug-in): the most information an expert assignment can carry about them."""
    counts = np.bincount(np.asarray(labels_N, dtype=np.int64)).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def load_matched_hash(
    token_ids_N: np.ndarray, top1_N: np.ndarray, num_experts: int, rng: np.random.Generator
) -> np.ndarray:
    """int64 ``[N]``: each token's expert under a random hash of its token id (one expert per distinct id) whose
    loads are those of ``top1_N`` (the trained layer's top-1 experts).

    The distinct ids, in a random order, are laid end to end, each as long as its count; the line is cut at the
    cumulative trained loads, and an id goes to the expert whose stretch holds its midpoint. So every expert's
    load is its trained load up to the ids that straddle its two cuts (exactly, when every id occurs once)."""
    token_ids_N = np.asarray(token_ids_N, dtype=np.int64)
    vocab_V, inverse_N, counts_V = np.unique(token_ids_N, return_inverse=True, return_counts=True)
    target_E = np.bincount(np.asarray(top1_N, dtype=np.int64), minlength=num_experts)
    order_V = rng.permutation(len(vocab_V))
    ends_V = np.cumsum(counts_V[order_V])
    mids_V = ends_V - counts_V[order_V] / 2.0
    # searchsorted(side="right") counts the cuts at or below a midpoint: the index of the expert whose stretch
    # [cut_{e-1}, cut_e) holds it; an expert with no trained load has an empty stretch and gets no id.
    expert_in_order_V = np.searchsorted(np.cumsum(target_E), mids_V, side="right").clip(max=num_experts - 1)
    expert_of_V = np.empty(len(vocab_V), dtype=np.int64)
    expert_of_V[order_V] = expert_in_order_V
    return expert_of_V[inverse_N]


def hash_null(
    token_ids_N: np.ndarray, top1_N: np.ndarray, categories_N: np.ndarray, num_experts: int,
    draws: int = 20, seed: int = 0,
) -> dict:
    """The category MI of load-matched random token hashes (:func:`load_matched_hash`) against the trained
    layer's: ``mutual_information_bits`` (mean over ``draws``), its standard deviation, ``p_value`` =
    ``(1 + #{hash MI >= trained MI}) / (1 + draws)``, and how far the hashes' loads are from the trained ones
    (``max_load_deviation``: the largest |hash share - trained share| over experts and draws)."""
    rng = np.random.default_rng(seed)
    trained = mutual_information_bits(top1_N, categories_N)
    N = max(len(top1_N), 1)
    target_E = np.bincount(top1_N, minlength=num_experts) / N
    mis, deviation = [], 0.0
    for _ in range(draws):
        hashed_N = load_matched_hash(token_ids_N, top1_N, num_experts, rng)
        mis.append(mutual_information_bits(hashed_N, categories_N))
        deviation = max(deviation, float(np.abs(np.bincount(hashed_N, minlength=num_experts) / N - target_E).max()))
    mis_arr = np.asarray(mis)
    return {
        "mutual_information_bits": float(mis_arr.mean()),
        "mutual_information_std_bits": float(mis_arr.std()),
        "p_value": (1 + int((mis_arr >= trained - 1e-12).sum())) / (1 + draws),
        "draws": draws,
        "max_load_deviation": deviation,
    }
