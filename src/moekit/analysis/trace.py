"""Routing trace: for every MoE layer and every token, the experts the router chose, their gates, and whether each
choice got a capacity slot or was dropped.

The trace is read from the model's own forward pass: each MoE layer returns its :class:`RoutingDecision` in
``aux.routing``, and which choices were kept comes from the dispatcher's own plan of that call (``aux.plan``), so
the trace is exactly what the layer did, not a re-implementation of it. Tests check this against the layer.

Columnar layout (one row per token, N rows; L MoE layers; K choices per token; E experts)::

    token_ids_N      int64   the input token
    window_N         int64   which window (sequence) of the analysed text the token is in
    position_N       int64   its position in that window
    expert_ids_LNK   int64   experts chosen (best first)
    gates_LNK        float32 combine weights
    kept_LNK         bool    True where the choice got a slot (False: dropped for capacity, or declined)
    probs_LNE        float32 router probabilities (for entropy and confidence)

An encoder-decoder (:class:`~moekit.models.Seq2SeqLM`) has two token streams, so :func:`trace_seq2seq` returns one
trace per stack: the encoder's over the (corrupted) inputs, the decoder's over the decoder inputs of teacher
forcing (the labels shifted right behind the start token), each position labelled with the token it holds, as the
decoder LM's trace is. Decoder positions whose label is ignored (-100) are left out (their routing is declined).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.errors import MoekitError
from moekit.layers.moe import MoE
from moekit.models.seq2seq import IGNORE_INDEX

__all__ = ["RoutingTrace", "trace_model", "trace_seq2seq", "iter_windows"]


@dataclass
class RoutingTrace:
    """Per-token routing of a model over some text (see the module docstring for the arrays)."""

    layer_blocks: list[int]  # block index of each MoE layer (what the report calls "layer")
    num_experts: int
    token_ids_N: np.ndarray
    window_N: np.ndarray
    position_N: np.ndarray
    expert_ids_LNK: np.ndarray
    gates_LNK: np.ndarray
    kept_LNK: np.ndarray
    probs_LNE: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_N.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids_LNK.shape[2])

    def save_safetensors(self, path: str | Path) -> Path:
        """Write the columns as one safetensors file (numpy arrays, no pickle); metadata holds the layer map."""
        from safetensors.numpy import save_file

        path = Path(path)
        save_file(
            {
                "token_ids_N": self.token_ids_N,
                "window_N": self.window_N,
                "position_N": self.position_N,
                "expert_ids_LNK": self.expert_ids_LNK,
                "gates_LNK": self.gates_LNK,
                "kept_LNK": self.kept_LNK.astype(np.uint8),
                "probs_LNE": self.probs_LNE,
            },
            str(path),
            metadata={"layer_blocks": json.dumps(self.layer_blocks), "num_experts": str(self.num_experts)},
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata()
        return cls(
            layer_blocks=json.loads(meta["layer_blocks"]),
            num_experts=int(meta["num_experts"]),
            token_ids_N=arrays["token_ids_N"],
            window_N=arrays["window_N"],
            position_N=arrays["position_N"],
            expert_ids_LNK=arrays["expert_ids_LNK"],
            gates_LNK=arrays["gates_LNK"],
            kept_LNK=arrays["kept_LNK"].astype(bool),
            probs_LNE=arrays["probs_LNE"],
        )

    def write_jsonl(self, path: str | Path, token_texts: Sequence[str] | None = None,
                    categories: Sequence[str] | None = None) -> Path:
        """One JSON object per token: its id (and text / category when given) and, per MoE layer, the experts,
        gates and kept flags."""
        path = Path(path)
        with path.open("w", encoding="utf-8") as f:
            for n in range(self.num_tokens):
                row: dict = {
                    "index": n,
                    "window": int(self.window_N[n]),
                    "position": int(self.position_N[n]),
                    "token_id": int(self.token_ids_N[n]),
                }
                if token_texts is not None:
                    row["token"] = token_texts[n]
                if categories is not None:
                    row["category"] = categories[n]
                row["layers"] = [
                    {
                        "block": block,
                        "experts": [int(e) for e in self.expert_ids_LNK[li, n]],
                        "gates": [round(float(g), 6) for g in self.gates_LNK[li, n]],
                        "kept": [bool(k) for k in self.kept_LNK[li, n]],
                    }
                    for li, block in enumerate(self.layer_blocks)
                ]
                f.write(json.dumps(row) + "\n")
        return path


def iter_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None) -> Iterator[Tensor]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens, ``batch_size`` per call, at most ``max_tokens``
    tokens in all (whole windows only)."""
    n_windows = len(tokens) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise MoekitError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    windows_WT = torch.from_numpy(np.asarray(tokens[: n_windows * seq_len], dtype=np.int64)).view(n_windows, seq_len)
    for i in range(0, n_windows, batch_size):
        yield windows_WT[i : i + batch_size]


def _layer_columns(aux_list: list, rows_S: Tensor | None) -> tuple[np.ndarray, ...]:
    """``(ids_LSK, gates_LSK, kept_LSK, probs_LSE)`` of one call's MoE layers, restricted to ``rows_S`` (bool,
    True = keep the position; None = all)."""
    ids, gates, kept, probs = [], [], [], []
    for aux in aux_list:
        decision = aux.routing
        cols = (decision.expert_ids_SK, decision.gates_SK.float(), aux.plan.kept_mask_SK(), decision.probs_SE.float())
        if rows_S is not None:
            cols = tuple(c[rows_S] for c in cols)
        for out, c in zip((ids, gates, kept, probs), cols, strict=True):
            out.append(c.cpu().numpy())
    return np.stack(ids), np.stack(gates), np.stack(kept), np.stack(probs)


def _check_token_choice(moe_layers: list[MoE]) -> None:
    if not moe_layers:
        raise MoekitError("the model has no MoE layers: there is no routing to analyse (a dense run?)")
    if any(m.config.router != "topk" for m in moe_layers):
        raise MoekitError("routing analysis supports token-choice (top-k) routers only")


@torch.no_grad()
def trace_model(model: torch.nn.Module, batches: Iterator[Tensor] | Sequence[Tensor]) -> RoutingTrace:
    """Run ``model`` (a :class:`moekit.models.TransformerLM`) in eval mode over token batches ``[B, T]`` and
    record every MoE layer's routing. Raises :class:`MoekitError` for a model without token-choice MoE layers."""
    moe_layers = list(model.moe_layers)
    _check_token_choice(moe_layers)
    layer_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)]
    was_training = model.training
    model.eval()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("tok", "win", "pos", "ids", "gates", "kept", "probs")}
    window_offset = 0
    try:
        for tokens_BT in batches:
            B, T = tokens_BT.shape
            out = model(tokens_BT)
            ids, gates, kept, probs = _layer_columns(out.aux, None)
            cols["tok"].append(tokens_BT.reshape(-1).cpu().numpy())
            cols["win"].append(np.repeat(np.arange(B) + window_offset, T))
            cols["pos"].append(np.tile(np.arange(T), B))
            cols["ids"].append(ids)
            cols["gates"].append(gates)
            cols["kept"].append(kept)
            cols["probs"].append(probs)
            window_offset += B
    finally:
        model.train(was_training)
    if not cols["tok"]:
        raise MoekitError("no tokens to analyse")
    return _assemble(cols, layer_blocks, moe_layers[0].config.num_experts)


def _assemble(cols: dict[str, list[np.ndarray]], layer_blocks: list[int], num_experts: int) -> RoutingTrace:
    return RoutingTrace(
        layer_blocks=layer_blocks,
        num_experts=num_experts,
        token_ids_N=np.concatenate(cols["tok"]).astype(np.int64),
        window_N=np.concatenate(cols["win"]).astype(np.int64),
        position_N=np.concatenate(cols["pos"]).astype(np.int64),
        expert_ids_LNK=np.concatenate(cols["ids"], axis=1).astype(np.int64),
        gates_LNK=np.concatenate(cols["gates"], axis=1).astype(np.float32),
        kept_LNK=np.concatenate(cols["kept"], axis=1).astype(bool),
        probs_LNE=np.concatenate(cols["probs"], axis=1).astype(np.float32),
    )


def _moe_blocks(stack: torch.nn.Module) -> list[int]:
    """Indices of a :class:`~moekit.models.seq2seq.T5Stack`'s blocks that hold an MoE sublayer, in order (the order
    of the stack's aux list: one MoE sublayer per block)."""
    return [i for i, b in enumerate(stack.blocks) if any(isinstance(sub.ffn, MoE) for sub in b.ff)]


@torch.no_grad()
def trace_seq2seq(
    model: torch.nn.Module, batches: Iterator[tuple[Tensor, Tensor]] | Sequence[tuple[Tensor, Tensor]]
) -> dict[str, RoutingTrace]:
    """Run ``model`` (a :class:`moekit.models.Seq2SeqLM`) in eval mode with teacher forcing over batches
    ``(inputs [B, S], labels [B, T])`` and record the routing of every MoE layer of both stacks: ``{"encoder":
    trace, "decoder": trace}``, a stack without MoE layers left out. The encoder trace's tokens are the inputs; the
    decoder trace's are the decoder inputs (``model.shift_right(labels)``), positions with label -100 left out.
    ``window`` is the example's index, ``position`` the position in its encoder input or decoder input. Raises
    :class:`MoekitError` for a model without token-choice MoE layers."""
    stacks = {"encoder": model.encoder, "decoder": model.decoder}
    blocks = {name: _moe_blocks(stack) for name, stack in stacks.items()}
    layers = {name: [m for m in stack.modules() if isinstance(m, MoE)] for name, stack in stacks.items()}
    _check_token_choice(layers["encoder"] + layers["decoder"])
    keys = ("tok", "win", "pos", "ids", "gates", "kept", "probs")
    cols: dict[str, dict[str, list[np.ndarray]]] = {name: {k: [] for k in keys} for name in stacks}
    was_training = model.training
    model.eval()
    offset = 0
    try:
        for inputs_BS, labels_BT in batches:
            B, S = inputs_BS.shape
            T = labels_BT.shape[1]
            out = model(inputs_BS, labels_BT)
            decoder_in_BT = model.shift_right(labels_BT)
            keep_BT = labels_BT != IGNORE_INDEX
            streams = {
                "encoder": (inputs_BS, None, out.encoder_aux, S),
                "decoder": (decoder_in_BT, keep_BT.reshape(-1), out.decoder_aux, T),
            }
            for name, (tokens_BX, rows_N, aux, X) in streams.items():
                if not layers[name]:
                    continue
                c = cols[name]
                ids, gates, kept, probs = _layer_columns(aux, rows_N)
                win_N = np.repeat(np.arange(B) + offset, X)
                pos_N = np.tile(np.arange(X), B)
                tok_N = tokens_BX.reshape(-1).cpu().numpy()
                if rows_N is not None:
                    keep = rows_N.cpu().numpy()
                    win_N, pos_N, tok_N = win_N[keep], pos_N[keep], tok_N[keep]
                for k, v in zip(keys, (tok_N, win_N, pos_N, ids, gates, kept, probs), strict=True):
                    c[k].append(v)
            offset += B
    finally:
        model.train(was_training)
    traces = {}
    for name in stacks:
        if not layers[name]:
            continue
        if not cols[name]["tok"] or sum(len(t) for t in cols[name]["tok"]) == 0:
            raise MoekitError("no tokens to analyse")
        traces[name] = _assemble(cols[name], blocks[name], layers[name][0].config.num_experts)
    return traces
