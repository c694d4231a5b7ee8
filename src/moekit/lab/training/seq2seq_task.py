"""The encoder-decoder task (``model.arch = "seq2seq"``): a T5 v1.1 / Switch / ST-MoE
:class:`~moekit.models.Seq2SeqLM` pre-trained with T5 span corruption on a text corpus.

The data is the language model's (the same corpus, split and byte-level BPE, plus ``data.sentinels`` sentinel
tokens); a training example is a raw window of the training tokens with about 15 % of them masked in spans of mean
length 3, each span replaced by a sentinel in the encoder input and spelled out after its sentinel in the target
(:mod:`moekit.data.span_corruption`). The loss, and everything the trainer counts per token, is per target token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.config import config_from_dict, suggest
from moekit.data.span_corruption import SpanCorruptionBatches, SpanCorruptionEvalData, span_corruption_lengths
from moekit.errors import ConfigError
from moekit.lab.data.config import Seq2SeqDataConfig
from moekit.lab.data.tokenizer import EOT, load_tokenizer, sentinel_ids
from moekit.lab.training.plots import plot_run
from moekit.lab.training.tasks import (
    TOKENIZER_FILE,
    TOKENS_FILE,
    ModelCost,
    PreparedData,
    _prompt_ids,
    _refuse,
    parse_moe,
    prepare_data,
)
from moekit.layers.config import MoEConfig
from moekit.models.seq2seq import Seq2SeqLM
from moekit.models.seq2seq_config import Seq2SeqConfig
from moekit.training.trainer import TrainResult

if TYPE_CHECKING:
    from moekit.lab.training.run_config import RunConfig

__all__ = ["Seq2SeqTask", "Seq2SeqData"]


@dataclasses.dataclass
class Seq2SeqData(PreparedData):
    """A seq2seq run's data: the language model's (token ids and tokenizer) plus the ids span corruption uses."""

    sentinel_ids: list[int] = dataclasses.field(default_factory=list)
    eos_id: int = 0


class Seq2SeqTask:
    """A :class:`~moekit.models.Seq2SeqLM` pre-trained with span corruption. ``[moe]`` configures the MoE layers of
    both stacks (``model.moe_every`` / ``moe_offset`` place them; ``model.dense_before_moe`` gives ST-MoE's extra
    dense FFN before each sparse one)."""

    arch = "seq2seq"
    title = "an encoder-decoder"
    unit = "token"
    model_config = Seq2SeqConfig
    data_config = Seq2SeqDataConfig
    data_files = (TOKENS_FILE, TOKENIZER_FILE)
    commands = frozenset({"eval", "generate", "analyze", "distill"})
    model_keys = [
        f.name for f in dataclasses.fields(Seq2SeqConfig)
        if f.name not in ("vocab_size", "encoder_moe", "decoder_moe")
    ] + ["arch"]

    # -- the config ------------------------------------------------------------------------------------------------
    def parse_model(self, model: dict[str, Any], moe: dict[str, Any] | None, data: Seq2SeqDataConfig) -> Seq2SeqConfig:
        for key in model:
            if key not in self.model_keys:
                hint = " (it is set by the tokenizer: use data.vocab_size)" if key == "vocab_size" else ""
                raise ConfigError(
                    f"unknown config key 'model.{key}'{hint or suggest(key, self.model_keys)} (model.arch = "
                    f"'seq2seq'); valid keys: {', '.join(self.model_keys)}"
                )
        if moe is not None and moe.get("router") == "soft":
            raise ConfigError("moe.router = 'soft' is not available in the encoder-decoder (use a ViT)")
        values = {k: v for k, v in model.items() if k != "arch"}
        layer = parse_moe(moe, model, Seq2SeqConfig)
        values.update(vocab_size=data.vocab_size, encoder_moe=layer, decoder_moe=layer)
        return config_from_dict(Seq2SeqConfig, values, "model")

    def model_table(self, model: Seq2SeqConfig) -> dict[str, Any]:
        if model.encoder_moe != model.decoder_moe:
            raise ConfigError("a run config holds one [moe] section for both stacks; the stacks' MoE configs differ")
        table = {"arch": self.arch, **dataclasses.asdict(model)}
        for key in ("vocab_size", "encoder_moe", "decoder_moe"):
            del table[key]
        return table

    def moe_of(self, model: Seq2SeqConfig) -> MoEConfig | None:
        return model.encoder_moe

    def check(self, config: RunConfig) -> None:
        d = config.data
        tokens_length, _ = span_corruption_lengths(d.seq_len, d.noise_density, d.mean_span_length)
        spans = max(1, round(round(tokens_length * d.noise_density) / d.mean_span_length))
        if spans > d.sentinels:
            raise ConfigError(
                f"a window of {tokens_length} tokens has up to {spans} masked spans, more than data.sentinels = "
                f"{d.sentinels} sentinel tokens"
            )

    # -- data and model --------------------------------------------------------------------------------------------
    def prepare(self, config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> Seq2SeqData:
        base = prepare_data(config, run_dir, log, sentinels=config.data.sentinels)
        tok = load_tokenizer(base.tokenizer_path)
        # An imported model ends sequences with its own end-of-sequence id (T5: "</s>"), a BPE trained here with
        # its end-of-text token.
        imported = config.data.tokenizer == "imported" and config.model.eos_token_id is not None
        return Seq2SeqData(
            **dataclasses.asdict(base), sentinel_ids=sentinel_ids(tok, config.data.sentinels),
            eos_id=config.model.eos_token_id if imported else tok.token_to_id(EOT),
        )

    def model_for_data(self, config: RunConfig, data: Seq2SeqData) -> Seq2SeqConfig:
        if config.data.tokenizer == "imported":  # the imported model's vocabulary and token ids
            return config.model
        return dataclasses.replace(config.model, vocab_size=data.vocab_size, eos_token_id=data.eos_id)

    def build_model(self, model_config: Seq2SeqConfig) -> Seq2SeqLM:
        return Seq2SeqLM(model_config)

    def _corruption(self, config: RunConfig, data: Seq2SeqData) -> dict[str, Any]:
        d = config.data
        return dict(sentinel_ids=data.sentinel_ids, eos_id=data.eos_id, noise_density=d.noise_density,
                    mean_noise_span_length=d.mean_span_length)

    def batches(self, config: RunConfig, data: Seq2SeqData) -> SpanCorruptionBatches:
        return SpanCorruptionBatches(data.train_tokens, config.train.batch_size, config.data.seq_len,
                                     config.train.seed, **self._corruption(config, data))

    def eval_data(self, config: RunConfig, data: Seq2SeqData) -> SpanCorruptionEvalData:
        return self.examples(config, data, data.val_tokens)

    def examples(self, config: RunConfig, data: Seq2SeqData, tokens: Any, seed: int = 0) -> SpanCorruptionEvalData:
        """Fixed span-corruption examples of the run's shape over any token ids (window ``w`` masked with
        ``default_rng([seed, w])``): the validation data over ``data.val_tokens``, what ``moekit analyze`` traces
        over other text, and what ``moekit distill`` measures the teacher's expert usage on."""
        return SpanCorruptionEvalData(tokens, config.data.seq_len, seed=seed, **self._corruption(config, data))

    # -- figures ---------------------------------------------------------------------------------------------------
    def _lengths(self, config: RunConfig) -> tuple[int, int]:
        d = config.data
        _, targets = span_corruption_lengths(d.seq_len, d.noise_density, d.mean_span_length)
        return d.seq_len, targets

    def cost(self, model_config: Seq2SeqConfig, config: RunConfig) -> ModelCost:
        from moekit.models.seq2seq_flops import seq2seq_flops_per_token, seq2seq_parameter_counts

        inputs, targets = self._lengths(config)
        counts = seq2seq_parameter_counts(model_config)
        flops = seq2seq_flops_per_token(model_config, inputs, targets)
        return ModelCost(counts["total"], counts["active"], flops["forward"], flops["train"], flops["train"])

    def batch_text(self, model_config: Seq2SeqConfig, config: RunConfig) -> str:
        inputs, targets = self._lengths(config)
        return f"{config.train.batch_size} examples of {inputs} input / {targets} target tokens"

    def baseline(self, config: RunConfig, data: Seq2SeqData) -> dict[str, float]:
        return {}

    def final_metrics(self, result: TrainResult) -> dict[str, Any]:
        loss = result.final_val_loss
        return {"final_val_perplexity": float(math.exp(loss)) if loss is not None else None}

    def cost_figures(self, cost: ModelCost) -> dict[str, Any]:
        return {}

    def plot(self, run_dir: Path, baseline: dict[str, float]) -> list[Path]:
        return plot_run(run_dir)

    def units_per_row(self, config: RunConfig) -> int:
        return self._lengths(config)[1]  # the trainer counts target tokens

    def loss_ceiling(self, config: RunConfig) -> float | None:
        return math.log(config.data.vocab_size)

    # -- the commands ----------------------------------------------------------------------------------------------
    def require(self, command: str, run_dir: Path) -> None:
        _refuse(self, command, run_dir)

    def describe(self, config: RunConfig) -> tuple[str, list[str]]:
        m: Seq2SeqConfig = config.model
        cost = self.cost(m, config)
        layer: MoEConfig | None = m.encoder_moe
        kind = "dense T5" if layer is None else f"MoE T5: {layer.num_experts} experts, top-{layer.top_k}"
        inputs, targets = self._lengths(config)
        return f"{kind}; {inputs} input / {targets} target tokens", [
            f"parameters: {cost.parameters:,} total, {cost.active_parameters:,} active per token "
            f"(vocabulary {config.data.vocab_size} assumed)",
            f"FLOPs per target token: {cost.forward_flops / 1e6:.2f} M forward, {cost.train_flops / 1e6:.2f} M "
            "training",
        ]

    def generate_text(
        self, model: Seq2SeqLM, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any
    ) -> str:
        # The prompt is the encoder's input (ended by end-of-text, as in training); the answer is the decoder's output
        # after its start token, up to end-of-text, with special tokens shown: for a prompt with sentinels
        # (<extra_id_0> ...), each sentinel followed by the span it stands for.
        eos = model.config.eos_token_id
        ids = _prompt_ids(tokenizer, prompt)
        inputs = torch.tensor([*ids, eos] if eos is not None else ids, dtype=torch.long)
        out = model.generate(inputs, max_new_tokens, eos_token_id=eos, **sampling).tolist()[1:]
        out = out[: out.index(eos)] if eos is not None and eos in out else out
        return tokenizer.decode(out, skip_special_tokens=False)

    def result_line(self, summary: dict[str, Any]) -> str | None:
        val = summary["final_val_loss"]
        if val is None:
            return None
        return (
            f"span-corruption validation loss {val:.3f} nats/target token (perplexity "
            f"{summary['final_val_perplexity']:.1f}); {summary['steps']} steps, {summary['tokens_per_s']:.0f} target "
            f"tokens/s, {summary['wall_seconds_this_session']:.0f}s"
        )

    def eval_line(self, loss: float, accuracy: float | None) -> str:
        return f"span-corruption validation loss {loss:.4f} nats/target token, perplexity {math.exp(loss):.2f}"
