"""Everything the routing report shows, computed once from a trace into a JSON-able dict (``analysis.json``).

Layers are named by their block index (``block 1`` = the second transformer block), experts by their index in
that layer's bank. The plots and the HTML report only render this dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.analysis.stats import (
    category_ids,
    contingency,
    expert_specialisation,
    layer_agreement,
    load_stats,
    mi_permutation_test,
    top_tokens,
)
from moekit.analysis.trace import RoutingTrace
from moekit.lab.analysis.categories import CATEGORIES

__all__ = ["summarise"]


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
) -> dict[str, Any]:
    """The analysis of ``trace``. ``vocab_texts[i]`` is token id i's text; ``categories[n]`` is the category of the
    n-th traced token (:func:`moekit.lab.analysis.categories.categorize` over the token texts in order)."""
    E, names = trace.num_experts, list(CATEGORIES)
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
