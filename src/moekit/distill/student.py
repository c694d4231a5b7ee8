"""The distillation student: the FLOP-matched dense model of the teacher, initialised from it.

Switch section 4.2 initialises the student with the teacher's non-expert weights; what to put in the dense FFN
that replaces each MoE layer is not stated, so moekit offers (``method``):

- ``"mean"``:   every hidden unit block is the mean of all experts' weights (``w_in``, ``w_gate``, ``w_out``);
- ``"top"``:    the k most-used experts (by kept assignments on a sample of training text), side by side, since
                the student's width is ``k * d_ff`` (k = the teacher's top-k);
- ``"random"``: the student's own fresh initialisation (a control: only the non-expert weights are copied).

The teacher's output at a token is ``sum_j g_j * expert_j(x)``, not ``expert(x)``: Switch does not renormalise the
top-1 gate, so an expert's output reaches the residual scaled by a gate of maybe 0.3. The copied ``w_out`` is
therefore scaled by the measured mean gate (``top``: of that expert's kept assignments; ``mean``: the mean total
kept gate per token, split over the k copies) so the student's FFN starts at the teacher's output scale.

An encoder-decoder teacher (:class:`~moekit.models.Seq2SeqLM`) is handled the same way, per stack:
:func:`seq2seq_student_config` is ``seq2seq_flop_matched_dense``, :func:`copy_non_expert_weights` copies every
parameter outside the MoE layers of both stacks (the dense FFN before an ST-MoE sparse one included), and
:func:`init_seq2seq_student_ffns` fills the dense FFN at each MoE sublayer from that stack's usage. A one-expert
top-1 teacher that drops nothing thus distils (``"mean"``) to a student computing the same function.

Shape legend: K copies side by side (the teacher's top-k), D model width, F expert hidden width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moekit.analysis.trace import RoutingTrace
from moekit.errors import ConfigError
from moekit.layers.moe import MoE
from moekit.models import TransformerLM
from moekit.models.config import LMConfig
from moekit.models.flops import flop_matched_dense
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_config import STACKS, Seq2SeqConfig
from moekit.models.seq2seq_flops import seq2seq_flop_matched_dense

__all__ = [
    "INIT_METHODS",
    "copy_non_expert_weights",
    "expert_usage",
    "init_seq2seq_student_ffns",
    "init_student_ffns",
    "seq2seq_student_config",
    "student_config",
]

INIT_METHODS = ("mean", "top", "random")


def student_config(teacher: LMConfig) -> LMConfig:
    """The FLOP-matched dense model: each MoE FFN becomes a dense FFN of width ``top_k * d_ff``."""
    if teacher.moe is None:
        raise ConfigError("the teacher is a dense model: distillation needs an MoE teacher")
    return flop_matched_dense(teacher)


def seq2seq_student_config(teacher: Seq2SeqConfig) -> Seq2SeqConfig:
    """The FLOP-matched dense encoder-decoder: each MoE FFN of either stack becomes a dense FFN of width
    ``top_k * d_ff`` at the same place (``seq2seq_flop_matched_dense``)."""
    if teacher.encoder_moe is None and teacher.decoder_moe is None:
        raise ConfigError("the teacher is a dense model: distillation needs an MoE teacher")
    return seq2seq_flop_matched_dense(teacher)


def _moe_prefixes(teacher: torch.nn.Module) -> tuple[str, ...]:
    """``"name."`` of every MoE module of ``teacher`` (its router, experts and shared experts lie below)."""
    return tuple(f"{name}." for name, m in teacher.named_modules() if isinstance(m, MoE))


@torch.no_grad()
def copy_non_expert_weights(teacher: torch.nn.Module, student: torch.nn.Module) -> list[str]:
    """Copy every teacher parameter outside the MoE layers (embeddings, attention, norms, dense FFNs) into the
    student; returns the names copied. Router and expert weights have no counterpart and are skipped. Works for a
    :class:`TransformerLM` and a :class:`Seq2SeqLM` (both stacks) alike: the student holds a dense FFN at the
    name of each teacher MoE module."""
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    skip = _moe_prefixes(teacher)
    copied = []
    for name, t in t_state.items():
        if skip and name.startswith(skip):
            continue
        if name not in s_state or s_state[name].shape != t.shape:
            raise ValueError(f"student has no parameter matching the teacher's {name} {tuple(t.shape)}")
        s_state[name].copy_(t)
        copied.append(name)
    return copied


def expert_usage(trace: RoutingTrace) -> list[dict[str, Any]]:
    """Per MoE layer: kept assignments per expert, each expert's mean kept gate, and the mean total kept gate per
    token (what ``init_student_ffns`` scales by)."""
    out = []
    for li in range(len(trace.layer_blocks)):
        ids, gates, kept = trace.expert_ids_LNK[li], trace.gates_LNK[li], trace.kept_LNK[li]
        E = trace.num_experts
        count_E = np.bincount(ids[kept], minlength=E)
        gate_sum_E = np.bincount(ids[kept], weights=gates[kept], minlength=E)
        out.append(
            {
                "block": trace.layer_blocks[li],
                "kept_per_expert": count_E.tolist(),
                "mean_gate_per_expert": [float(s / c) if c else 0.0 for s, c in zip(gate_sum_E, count_E, strict=True)],
                "mean_total_gate": float((gates * kept).sum(axis=1).mean()),
            }
        )
    return out


@torch.no_grad()
def _init_dense(moe: MoE, dense: torch.nn.Module, method: str, u: dict[str, Any] | None) -> dict[str, Any]:
    """Fill the dense FFN that replaces ``moe`` by ``method`` (not "random") from that layer's usage ``u``;
    returns the record's ``method``, ``experts`` and ``w_out_scale``."""
    bank, k = moe.experts, moe.config.top_k
    if method == "mean":
        chosen = None
        w_in_KDF = bank.w_in.mean(0, keepdim=True).expand(k, -1, -1)
        w_gate_KDF = None if bank.w_gate is None else bank.w_gate.mean(0, keepdim=True).expand(k, -1, -1)
        scale_K = torch.full((k,), u["mean_total_gate"] / k)
        w_out_KFD = bank.w_out.mean(0, keepdim=True).expand(k, -1, -1)
    else:
        chosen = [int(e) for e in np.argsort(-np.asarray(u["kept_per_expert"]), kind="stable")[:k]]
        w_in_KDF = bank.w_in[chosen]
        w_gate_KDF = None if bank.w_gate is None else bank.w_gate[chosen]
        scale_K = torch.tensor([u["mean_gate_per_expert"][e] for e in chosen])
        w_out_KFD = bank.w_out[chosen]
    # Side by side: hidden units [j*F, (j+1)*F) are copy j.
    dense.w_in.copy_(torch.cat(list(w_in_KDF), dim=1))
    if dense.w_gate is not None and w_gate_KDF is not None:
        dense.w_gate.copy_(torch.cat(list(w_gate_KDF), dim=1))
    dense.w_out.copy_(torch.cat([w * s for w, s in zip(w_out_KFD, scale_K.tolist(), strict=True)], dim=0))
    return {"method": method, "experts": chosen, "w_out_scale": scale_K.tolist()}


def _check_method(method: str, usage: object) -> None:
    if method not in INIT_METHODS:
        raise ConfigError(f"unknown student initialisation {method!r}; choose one of {', '.join(INIT_METHODS)}")
    if method != "random" and usage is None:
        raise ConfigError(f"init {method!r} needs the teacher's expert usage")


@torch.no_grad()
def init_student_ffns(
    teacher: TransformerLM, student: TransformerLM, method: str, usage: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Set the student's FFN at each teacher MoE position by ``method``; returns what was done per layer."""
    _check_method(method, usage)
    by_block = {u["block"]: u for u in usage or []}
    done = []
    for i, block in enumerate(teacher.blocks):
        if not isinstance(block.ffn, MoE):
            continue
        if method == "random":
            done.append({"block": i, "method": "random"})
            continue
        done.append({"block": i, **_init_dense(block.ffn, student.blocks[i].ffn, method, by_block[i])})
    return done


@torch.no_grad()
def init_seq2seq_student_ffns(
    teacher: Seq2SeqLM, student: Seq2SeqLM, method: str, usage: dict[str, list[dict[str, Any]]] | None = None
) -> list[dict[str, Any]]:
    """:func:`init_student_ffns` for an encoder-decoder: ``usage[stack]`` is :func:`expert_usage` of that stack's
    trace; each MoE sublayer's dense replacement (same stack, block and sublayer) is set by ``method``. Returns
    one record per MoE layer, with its ``stack`` and ``block``."""
    _check_method(method, usage)
    done = []
    for stack in STACKS:
        by_block = {u["block"]: u for u in (usage or {}).get(stack, [])}
        t_blocks, s_blocks = getattr(teacher, stack).blocks, getattr(student, stack).blocks
        for i, block in enumerate(t_blocks):
            for j, sub in enumerate(block.ff):
                if not isinstance(sub.ffn, MoE):
                    continue
                if method == "random":
                    done.append({"stack": stack, "block": i, "method": "random"})
                    continue
                record = _init_dense(sub.ffn, s_blocks[i].ff[j].ffn, method, by_block[i])
                done.append({"stack": stack, "block": i, **record})
    return done
