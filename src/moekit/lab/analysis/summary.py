"""Everything the routing report shows, computed once from a trace into a JSON-able dict (``analysis.json``).

Layers are named by their block index (``block 1`` = the second transformer block), experts by their index in
that layer's bank. The plots and the HTML report only render this dict.

An encoder-decoder (:func:`summarise_seq2seq`) gets one such analysis per stack, its layers named "encoder block i"
/ "decoder block i", each layer's category MI set beside two null models (the untrained model's, and a load-matched
random token hash's), and a per-stack line comparing the three (docs/ANALYSIS.md, "Encoder-decoder runs").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.analysis.stats import (
    category_ids,
    contingency,
    entropy_bits,
    expert_specialisation,
    hash_null,
    layer_agreement,
    load_stats,
    mi_permutation_test,
    mutual_information_bits,
    top_tokens,
)
from moekit.analysis.trace import RoutingTrace
from moekit.lab.analysis.categories import CATEGORIES, SEQ2SEQ_CATEGORIES

__all__ = ["summarise", "summarise_seq2seq"]


def _finite(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def summarise(
    trace: RoutingTrace,
    vocab_texts: Sequence[str],
    categories: Sequence[str],
    *,
    top_n: int = 10,
    num_permutations: int = 100,
    seed: int = 0,
    names: Sequence[str] = CATEGORIES,
) -> dict[str, Any]:
    """The analysis of ``trace``. ``vocab_texts[i]`` is token id i's text; ``categories[n]`` is the category of the
    n-th traced token (:func:`moekit.lab.analysis.categories.categorize` over the token texts in order), one of
    ``names``."""
    E, names = trace.num_experts, list(names)
    cat_N = category_ids(categories, names)
    corpus_counts_C = np.bincount(cat_N, minlength=len(names))
    layers = []
    for li, block in enumerate(trace.layer_blocks):
        ids_NK = trace.expert_ids_LNK[li]
        spec = expert_specialisation(contingency(ids_NK, cat_N, E, len(names)), corpus_counts_C)
        mi, mi_chance, mi_p = mi_permutation_test(ids_NK[:, 0], cat_N, num_permutations, seed)
        experts = []
        for e in range(E):
            experts.append(
                {
                    "expert": e,
                    "top_tokens": [
                        {"id": t, "text": vocab_texts[t] if t < len(vocab_texts) else f"<{t}>", "count": c}
                        for t, c in top_tokens(ids_NK, trace.token_ids_N, e, top_n)
                    ],
                    "category_counts": spec.counts_EC[e].tolist(),
                    "category_share": spec.share_EC[e].tolist(),
                    "enrichment": [_finite(v) for v in spec.enrichment_EC[e]],
                    "chi2": float(spec.chi2_E[e]),
                    "p_value": float(spec.p_E[e]),
                }
            )
        layers.append(
            {
                "block": block,
                "load": load_stats(ids_NK, trace.kept_LNK[li], trace.probs_LNE[li], E),
                "experts": experts,
                "chi2_dof": spec.dof,
                "category_mi_bits": mi,
                "category_mi_chance_bits": mi_chance,
                "category_mi_p_value": mi_p,
            }
        )
    agreement = []
    for li in range(len(trace.layer_blocks) - 1):
        a = layer_agreement(
            trace.expert_ids_LNK[li][:, 0], trace.expert_ids_LNK[li + 1][:, 0], E, num_permutations, seed
        )
        agreement.append({"from_block": trace.layer_blocks[li], "to_block": trace.layer_blocks[li + 1], **a})
    return {
        "num_tokens": trace.num_tokens,
        "num_experts": E,
        "top_k": trace.top_k,
        "categories": names,
        "corpus_category_counts": corpus_counts_C.tolist(),
        "corpus_category_share": (corpus_counts_C / max(int(corpus_counts_C.sum()), 1)).tolist(),
        "layers": layers,
        "agreement": agreement,
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarise_seq2seq(
    traces: dict[str, RoutingTrace],
    untrained: dict[str, RoutingTrace],
    vocab_texts: Sequence[str],
    categories: dict[str, Sequence[str]],
    *,
    top_n: int = 10,
    num_permutations: int = 100,
    hash_draws: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """The analysis of an encoder-decoder: ``traces`` and ``untrained`` (the same examples through the untrained
    model) per stack, ``categories[stack][n]`` the category (:data:`SEQ2SEQ_CATEGORIES`) of the stack's n-th traced
    token. Each stack's dict is :func:`summarise`'s, with per layer ``stack``, ``name``, ``untrained`` (its MI and
    load) and ``hash`` (:func:`moekit.analysis.stats.hash_null`); ``stack_summary`` holds one line per stack: the
    means over its MoE layers of the trained, untrained, load-matched hash and shuffled-label MIs."""
    names = list(SEQ2SEQ_CATEGORIES)
    stacks: dict[str, Any] = {}
    lines = []
    for stack, trace in traces.items():
        base = untrained[stack]
        if not np.array_equal(base.token_ids_N, trace.token_ids_N) or base.layer_blocks != trace.layer_blocks:
            raise ValueError(f"the untrained {stack} trace is not over the same tokens and layers")
        s = summarise(trace, vocab_texts, categories[stack], top_n=top_n, num_permutations=num_permutations,
                      seed=seed, names=names)
        cat_N = category_ids(categories[stack], names)
        E = trace.num_experts
        for li, layer in enumerate(s["layers"]):
            layer["stack"] = stack
            layer["name"] = f"{stack} block {layer['block']}"
            load = load_stats(base.expert_ids_LNK[li], base.kept_LNK[li], base.probs_LNE[li], E)
            layer["untrained"] = {
                "category_mi_bits": mutual_information_bits(base.expert_ids_LNK[li][:, 0], cat_N),
                "share_per_expert": load["share_per_expert"],
                "entropy_normalised": load["entropy_normalised"],
                "mean_top1_prob": load["mean_top1_prob"],
            }
            layer["hash"] = hash_null(trace.token_ids_N, trace.expert_ids_LNK[li][:, 0], cat_N, E, hash_draws, seed)
        for a in s["agreement"]:
            a["from_name"] = f"{stack} block {a['from_block']}"
            a["to_name"] = f"{stack} block {a['to_block']}"
        s["stack"] = stack
        s["category_entropy_bits"] = entropy_bits(cat_N)
        stacks[stack] = s
        layers = s["layers"]
        lines.append(
            {
                "stack": stack,
                "layers": [la["name"] for la in layers],
                "num_tokens": s["num_tokens"],
                "category_entropy_bits": s["category_entropy_bits"],
                "trained_mi_bits": _mean([la["category_mi_bits"] for la in layers]),
                "untrained_mi_bits": _mean([la["untrained"]["category_mi_bits"] for la in layers]),
                "hash_mi_bits": _mean([la["hash"]["mutual_information_bits"] for la in layers]),
                "shuffled_mi_bits": _mean([la["category_mi_chance_bits"] for la in layers]),
            }
        )
    return {
        "arch": "seq2seq",
        "categories": names,
        "hash_draws": hash_draws,
        "stacks": stacks,
        "stack_summary": lines,
    }
