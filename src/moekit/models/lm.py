"""``TransformerLM``: a decoder-only language model whose FFNs are dense or MoE (Switch / GLaM / ST-MoE
layouts).

The model returns its logits together with every MoE layer's aux (losses and metrics) and, given targets, the
training loss ``CE + c_B * mean_layers(L_B) + c_z * mean_layers(L_Z)`` (docs/ALGORITHMS.md section 2; averaging over MoE
layers follows T5X). Nothing is stashed in module state between calls.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.aux import MoEAux, model_loss
from moekit.layers.moe import MoE
from moekit.models.blocks import Block, RMSNorm, dense_ffn
from moekit.models.config import LMConfig

__all__ = ["TransformerLM", "LMOutput"]


@dataclass
class LMOutput:
    """What ``TransformerLM.forward`` returns.

    Attributes:
        logits_BTV: next-token logits (the autocast dtype under autocast).
        aux: one :class:`MoEAux` per MoE block, in block order (empty for a dense model).
        loss: total training loss (float32 scalar) when targets were given, else None.
        ce_loss: mean token cross-entropy (float32) when targets were given.
        load_balancing_loss: mean over MoE layers of L_B (0 for a dense model).
        z_loss: mean over MoE layers of L_Z (0 for a dense model).
    """

    logits_BTV: Tensor
    aux: list[MoEAux] = field(default_factory=list)
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    load_balancing_loss: Tensor | None = None
    z_loss: Tensor | None = None


class TransformerLM(nn.Module):
    """Pre-norm decoder with RMSNorm, rotary causal attention and tied embeddings (option).

    Block ``i`` holds an MoE FFN when ``config.is_moe_layer(i)``; the others a dense FFN. Call
    ``model(tokens_BT, targets_BT)`` to get an :class:`LMOutput`.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"TransformerLM expects an LMConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        # Small embeddings, as GPT-2: with tied weights they are also the output projection.
        nn.init.normal_(self.embed.weight, mean=0.0, std=0.02)
        blocks = []
        for i in range(c.n_layers):
            if c.is_moe_layer(i):
                ffn: nn.Module = MoE(c.moe)
            else:
                moe_position = c.moe is None and i % c.moe_every == c.moe_offset
                d_ff = c.dense_d_ff_at_moe if (moe_position and c.dense_d_ff_at_moe) else c.d_ff
                ffn = dense_ffn(c.d_model, d_ff, c.activation, c.init_scale)
            blocks.append(
                Block(
                    ffn,
                    c.d_model,
                    c.n_heads,
                    c.max_seq_len,
                    rope_base=c.rope_base,
                    init_scale=c.init_scale,
                    dropout=c.dropout,
                    norm_eps=c.norm_eps,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)
        # With tied embeddings there is no separate head parameter: safetensors refuses shared storage, and one
        # tensor is what gets saved either way.
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        if self.head is not None:
            nn.init.normal_(self.head.weight, mean=0.0, std=0.02)

    def forward(
        self, tokens_BT: Tensor, targets_BT: Tensor | None = None, replay: list[Tensor] | None = None
    ) -> LMOutput:
        """Logits (and losses when ``targets_BT`` is given). ``replay``: one int64 ``[B * T, k]`` tensor of expert ids
        per MoE layer, in block order (``[a.routing.expert_ids_SK for a in out.aux]`` of an earlier pass): every MoE
        layer routes to exactly those experts, with gates from this pass's routers (router replay)."""
        c = self.config
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens_BT.shape)}")
        if tokens_BT.shape[1] > c.max_seq_len:
            raise ValueError(
                f"sequence length {tokens_BT.shape[1]} exceeds model.max_seq_len={c.max_seq_len}"
            )
        x_BTD = self.embed(tokens_BT)
        aux: list[MoEAux] = []
        replay_iter = None
        if replay is not None:
            if len(replay) != len(self.moe_layers):
                raise ValueError(f"replay needs one routing per MoE layer ({len(self.moe_layers)}), got {len(replay)}")
            replay_iter = iter(replay)
        for block in self.blocks:
            if replay_iter is not None and isinstance(block.ffn, MoE):
                x_BTD, block_aux = block(x_BTD, replay=next(replay_iter))
            else:
                x_BTD, block_aux = block(x_BTD)
            if block_aux is not None:
                aux.append(block_aux)
        h_BTD = self.final_norm(x_BTD)
        w_VD = self.embed.weight if self.head is None else self.head.weight
        logits_BTV = F.linear(h_BTD, w_VD)
        out = LMOutput(logits_BTV=logits_BTV, aux=aux)
        if targets_BT is None:
            return out
        # Cross-entropy in float32: the logsumexp over V of bf16 logits loses precision.
        ce = F.cross_entropy(logits_BTV.float().reshape(-1, c.vocab_size), targets_BT.reshape(-1))
        out.ce_loss = ce
        out.loss, out.load_balancing_loss, out.z_loss = model_loss(ce, aux, c.load_balance_coef, c.z_loss_coef)
        return out

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def generate(
        self,
        prompt_T: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` after a 1-D prompt (recomputing the window each step; tiny models only).

        Temperature 0 means greedy decoding. Returns the prompt followed by the new tokens.
        """
        if prompt_T.dim() != 1 or prompt_T.numel() == 0:
            raise ValueError("the prompt must encode to at least one token")
        seq_T = prompt_T.clone()
        for _ in range(max_new_tokens):
            window_1T = seq_T[-self.config.max_seq_len :].unsqueeze(0)
            logits_V = self(window_1T).logits_BTV[0, -1].float()
            if temperature <= 0:
                nxt = logits_V.argmax().view(1)
            else:
                logits_V = logits_V / temperature
                if top_k is not None and top_k < logits_V.numel():
                    kth = torch.topk(logits_V, top_k).values[-1]
                    logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator)
            seq_T = torch.cat([seq_T, nxt.to(seq_T.dtype)])
        return seq_T
