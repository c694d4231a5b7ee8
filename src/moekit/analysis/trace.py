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

__all__ = ["RoutingTrace", "trace_model", "iter_windows"]


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


@torch.no_grad()
def trace_model(model: torch.nn.Module, batches: Iterator[Tensor] | Sequence[Tensor]) -> RoutingTrace:
    """Run ``model`` (a :class:`moekit.models.TransformerLM`) in eval mode over token batches ``[B, T]`` and
    record every MoE layer's routing. Raises :class:`MoekitError` for a model without token-choice MoE layers."""
    moe_layers = list(model.moe_layers)
    if not moe_layers:
        raise MoekitError("the model has no MoE layers: there is no routing to analyse (a dense run?)")
    if any(m.config.router != "topk" for m in moe_layers):
        raise MoekitError("routing analysis supports token-choice (top-k) routers only")
    layer_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)]
    was_training = model.training
    model.eval()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("tok", "win", "pos", "ids", "gates", "kept", "probs")}
    window_offset = 0
    try:
        for tokens_BT in batches:
            B, T = tokens_BT.shape
            out = model(tokens_BT)
            ids, gates, kept, probs = [], [], [], []
            for aux in out.aux:
                decision = aux.routing
                ids.append(decision.expert_ids_SK.cpu().numpy())
                gates.append(decision.gates_SK.float().cpu().numpy())
                kept.append(aux.plan.kept_mask_SK().cpu().numpy())
                probs.append(decision.probs_SE.float().cpu().numpy())
            cols["tok"].append(tokens_BT.reshape(-1).cpu().numpy())
            cols["win"].append(np.repeat(np.arange(B) + window_offset, T))
            cols["pos"].append(np.tile(np.arange(T), B))
            cols["ids"].append(np.stack(ids))
            cols["gates"].append(np.stack(gates))
            cols["kept"].append(np.stack(kept))
            cols["probs"].append(np.stack(probs))
            window_offset += B
    finally:
        model.train(was_training)
    if not cols["tok"]:
        raise MoekitError("no tokens to analyse")
    return RoutingTrace(
        layer_blocks=layer_blocks,
        num_experts=moe_layers[0].config.num_experts,
        token_ids_N=np.concatenate(cols["tok"]).astype(np.int64),
        window_N=np.concatenate(cols["win"]).astype(np.int64),
        position_N=np.concatenate(cols["pos"]).astype(np.int64),
        expert_ids_LNK=np.concatenate(cols["ids"], axis=1).astype(np.int64),
        gates_LNK=np.concatenate(cols["gates"], axis=1).astype(np.float32),
        kept_LNK=np.concatenate(cols["kept"], axis=1).astype(bool),
        probs_LNE=np.concatenate(cols["probs"], axis=1).astype(np.float32),
    )
