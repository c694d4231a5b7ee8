"""The Python entry points to what ``moekit train`` writes: train a run from a config, and load a trained run's
model, tokenizer and config (docs/API.md).

They live in the lab, not the core: a run directory holds a tokenizer (the ``tokenizers`` package) and a TOML run
config, which the core (``moekit`` outside ``moekit.lab``: torch, numpy and safetensors only) never reads.
``moekit.lab`` exposes them lazily (``moekit.lab.load_run``), so importing ``moekit.lab`` stays cheap.

Neither function changes a process-wide setting: torch's thread count and glibc's malloc tuning are the command
line's (``moekit.lab.runtime.set_threads`` and ``tune_malloc`` apply them when you want the same from Python).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.errors import MoekitError

__all__ = ["TrainedRun", "load_run", "train"]


@dataclass(repr=False)
class TrainedRun:
    """A trained run directory, loaded: its model (weights of the newest valid checkpoint, in eval mode), tokenizer
    and config.

    Attributes:
        run_dir: the directory.
        config: the run config (``RunConfig``: ``config.model``, ``config.train``, ``config.data``...).
        model: a ``TransformerLM`` (language model), ``ViT`` (image classifier) or ``Seq2SeqLM`` (encoder-decoder).
        tokenizer: the run's ``tokenizers.Tokenizer``; None for an image classifier.
        step: the optimizer step of the loaded weights.
        checkpoint: the checkpoint directory the weights came from.
        data: what the run's task prepared (token arrays, image splits), for evaluation.
    """

    run_dir: Path
    config: Any
    model: nn.Module
    tokenizer: Any
    step: int
    checkpoint: Path
    data: Any = field(default=None)

    @property
    def model_config(self) -> Any:
        """The model's own config (``LMConfig``, ``ViTConfig`` or ``Seq2SeqConfig``)."""
        return self.model.config

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise MoekitError(f"{self.run_dir} is an image-classifier run: it has no tokenizer")
        return self.tokenizer

    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``[T]`` (int64) of ``text``, as the run's data was encoded (no special tokens added)."""
        ids = self._need_tokenizer().encode(text, add_special_tokens=False).ids
        if not ids:
            raise MoekitError(f"the text {text!r} encodes to no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of token ids ``[T]``."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes token ids [T], got shape {tuple(ids.shape)}; decode each row")
            ids = ids.tolist()
        return self._need_tokenizer().decode(list(ids))

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 40,
        *,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
    ) -> str | list[str]:
        """The prompt followed by ``max_new_tokens`` sampled tokens, as text (``moekit generate``'s defaults;
        temperature 0 is greedy). A list of prompts gives a list of texts (each prompt sampled on its own, so
        prompts of different token lengths are fine)."""
        if self.config.arch != "lm":
            raise MoekitError(f"generate works on language-model runs; {self.run_dir} is model.arch = "
                              f"{self.config.arch!r} (call run.model directly)")
        if isinstance(prompt, str):
            gen = torch.Generator().manual_seed(seed)
            out_T = self.model.generate(self.encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                                        generator=gen)
            return self.decode(out_T)
        return [self.generate(p, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed) for p in prompt]

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (f"TrainedRun({str(self.run_dir)!r}, model={type(self.model).__name__} ({params:,} parameters), "
                f"step={self.step}, tokenizer={'yes' if self.tokenizer is not None else 'none'})")


def load_run(run_dir: str | Path, *, fallback: bool = False) -> TrainedRun:
    """Load the run that ``moekit train`` wrote to ``run_dir``: its model with the weights of the newest checkpoint
    (eval mode, on the CPU), its tokenizer and its config.

    A newest checkpoint that fails its checksum is an error; ``fallback=True`` takes the newest one that passes
    (as ``moekit eval --fallback`` does). A missing directory, a run without a checkpoint or damaged files are
    one-line :class:`~moekit.errors.MoekitError`\\ s."""
    from moekit.lab.data.tokenizer import load_tokenizer
    from moekit.lab.training.run import load_trained_run

    loaded = load_trained_run(run_dir, fallback=fallback)
    tokenizer_path = getattr(loaded.data, "tokenizer_path", None)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    return TrainedRun(loaded.run_dir, loaded.config, loaded.model, tokenizer, loaded.step, loaded.checkpoint,
                      loaded.data)


def _override(key: str, value: Any) -> str:
    """``section.key=value`` with ``value`` written as TOML (what ``--set`` parses)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (str, Path)):
        text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        raise MoekitError(f"override {key}: give a number, a boolean or a string, got {type(value).__name__}")
    return f"{key}={text}"


def train(
    config: str | Path | None = "switch-tiny",
    run_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``moekit train`` from Python: train ``config`` (a TOML path or a name from ``configs/``) into ``run_dir``
    (default ``runs/<config>-<time>``) and return the summary (also in ``run_dir/summary.json``).

    ``overrides``: ``{"train.max_steps": 20, "data.corpus": "my.txt"}`` or ``["train.max_steps=20"]``, as
    ``--set``. ``log`` receives the progress lines (default: none). Unlike the command, this does not set torch's
    thread count or tune glibc's malloc (see the module docstring)."""
    from moekit.lab.training.run import default_run_dir, train_run
    from moekit.lab.training.run_config import load_run_config

    items = [_override(k, v) for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides)
    run_config = load_run_config(config, items)
    if run_dir is None:
        run_dir = default_run_dir(Path(str(config)).stem if config is not None else "run")
    return train_run(run_config, run_dir, log=log or (lambda msg: None))
