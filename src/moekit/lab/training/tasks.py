"""One :class:`Task` per kind of model ``moekit`` trains, and ``TASKS``, the registry from ``model.arch`` to it:

- ``"lm"``: :class:`LanguageModelTask`, a :class:`~moekit.models.TransformerLM` on a text corpus (``[data]`` =
  :class:`~moekit.lab.data.config.DataConfig`);
- ``"vit"``: :class:`ImageClassifierTask`, a :class:`~moekit.models.ViT` on an image set (``[data]`` =
  :class:`~moekit.lab.data.config.ImageDataConfig`).

A task owns everything that differs between them: the ``[model]`` section it parses and writes back, preparing and
loading a run's data, the training batches and evaluation data, the model, its parameter and FLOP counts, the
baseline and the figures of the summary, the plots, the lines the commands print, and which commands it supports.
The run config, the run driver (:mod:`moekit.lab.training.run`), ``compare`` and the commands call the task, so
none of them branches on the architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as np_save
from tokenizers import Tokenizer
from torch import nn

from moekit.atomic import WriteError, atomic_write_bytes, check_writable, is_disk_error, make_dirs
from moekit.config import config_from_dict, suggest
from moekit.data.batches import TokenBatches, TokenEvalData, unigram_cross_entropy
from moekit.data.images import ImageBatches, ImageEvalData
from moekit.errors import ConfigError, MoekitError
from moekit.lab.data.config import DataConfig, ImageDataConfig
from moekit.lab.data.corpus import load_corpus
from moekit.lab.data.images import ImageSplits, load_images
from moekit.lab.data.split import cut_pieces, split_pieces
from moekit.lab.data.tokenizer import EOT, encode_pieces, load_tokenizer, sentinel_ids, train_tokenizer
from moekit.lab.training.plots import plot_run
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.models import TransformerLM, parameter_counts
from moekit.models.config import LMConfig
from moekit.models.flops import flops_per_token
from moekit.models.vit import ViT, ViTConfig, vit_flops_per_image, vit_parameter_counts
from moekit.training.trainer import BatchSource, EvalData, TrainResult

if TYPE_CHECKING:
    from moekit.lab.training.run_config import RunConfig

__all__ = [
    "ARCHS",
    "TASKS",
    "ImageClassifierTask",
    "LanguageModelTask",
    "ModelCost",
    "PreparedData",
    "RUN_COMMANDS",
    "Task",
    "TOKENIZER_FILE",
    "TOKENS_FILE",
    "moe_table",
    "parse_moe",
    "prepare_data",
    "prepare_images",
    "task_for_arch",
    "task_of",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENS_FILE = "data/tokens.safetensors"

# The lab commands that take a trained run; train, validate and compare take a config and work on every task.
RUN_COMMANDS = ("eval", "generate", "analyze", "distill")

_SOFT_KEYS = [f.name for f in dataclasses.fields(SoftMoEConfig)] + ["router"]


@dataclass(frozen=True)
class ModelCost:
    """Size and cost of a task's model. An example is what the trainer counts per batch row: a token for a language
    model, an image for a classifier.

    Attributes:
        parameters: all parameters.
        active_parameters: parameters used per token (routing included, see the model's counting function).
        forward_flops: FLOPs of one forward pass per example.
        train_flops: FLOPs of one training step per example (3 x forward).
        train_flops_per_token: ``train_flops`` per token (an image holds several).
    """

    parameters: int
    active_parameters: int
    forward_flops: float
    train_flops: float
    train_flops_per_token: float


class Task(Protocol):
    """What one kind of run (model and data) supplies to the run config, the run driver, compare and the commands.

    Attributes:
        arch: its ``model.arch`` value.
        title: what it is, in a sentence ("an image classifier").
        unit: what the trainer counts per batch row and the FLOPs are given per ("token", "image").
        model_config: the dataclass of its ``[model]`` section (``moe`` inside it is the ``[moe]`` section).
        data_config: the dataclass of its ``[data]`` section.
        data_files: files of a run directory that hold the prepared data, in the order to copy them (a run of the
            same ``[data]`` may reuse them); empty when nothing is written.
        commands: the commands of :data:`RUN_COMMANDS` it supports.
    """

    arch: str
    title: str
    unit: str
    model_config: type
    data_config: type
    data_files: tuple[str, ...]
    commands: frozenset[str]

    # -- the config ------------------------------------------------------------------------------------------------
    def parse_model(self, model: dict[str, Any], moe: dict[str, Any] | None, data: Any) -> Any:
        """The typed ``[model]`` (with its ``[moe]``) from the TOML tables; strict keys, values checked."""
        ...

    def model_table(self, model: Any) -> dict[str, Any]:
        """The ``[model]`` table that :meth:`parse_model` reads back to ``model`` (``moe`` excluded)."""
        ...

    def moe_of(self, model: Any) -> MoEConfig | SoftMoEConfig | None:
        """The model's ``[moe]`` section (None for a dense model)."""
        ...

    def check(self, config: RunConfig) -> None:
        """Checks across sections (e.g. the context length against the model's)."""
        ...

    # -- data and model --------------------------------------------------------------------------------------------
    def prepare(self, config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> Any:
        """The run's data, read from ``run_dir`` when it was prepared there before, else built (and saved there)."""
        ...

    def model_for_data(self, config: RunConfig, data: Any) -> Any:
        """The model config with what only the data fixes (a tokenizer's vocabulary)."""
        ...

    def build_model(self, model_config: Any) -> nn.Module: ...

    def batches(self, config: RunConfig, data: Any) -> BatchSource:
        """The resumable training batches of ``train.batch_size`` (the global batch under expert parallelism: the
        trainer gives each rank its contiguous share of the rows)."""
        ...

    def eval_data(self, config: RunConfig, data: Any) -> EvalData: ...

    # -- figures ---------------------------------------------------------------------------------------------------
    def cost(self, model_config: Any, config: RunConfig) -> ModelCost: ...

    def batch_text(self, model_config: Any, config: RunConfig) -> str:
        """One training batch in words, for the log."""
        ...

    def baseline(self, config: RunConfig, data: Any) -> dict[str, float]:
        """The summary's reference figures of a model that learns nothing useful."""
        ...

    def final_metrics(self, result: TrainResult) -> dict[str, Any]:
        """The summary's figures beside ``final_val_loss``."""
        ...

    def cost_figures(self, cost: ModelCost) -> dict[str, Any]:
        """The summary's cost figures beside the per-token ones."""
        ...

    def plot(self, run_dir: Path, baseline: dict[str, float]) -> list[Path]: ...

    def units_per_row(self, config: RunConfig) -> int:
        """Examples the trainer counts per batch row (``tokens_per_s`` counts these)."""
        ...

    def loss_ceiling(self, config: RunConfig) -> float | None:
        """A validation loss above this is a blow-up (compare counts the run as diverged); None: no such bound."""
        ...

    # -- the commands ----------------------------------------------------------------------------------------------
    def require(self, command: str, run_dir: Path) -> None:
        """Raise a one-line :class:`MoekitError` when ``command`` does not work on this task's runs."""
        ...

    def describe(self, config: RunConfig) -> tuple[str, list[str]]:
        """``moekit validate``: the model in a few words, and the lines of its size and cost."""
        ...

    def generate_text(self, model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any) -> str:
        """``moekit generate``: the text to print for a prompt (``sampling``: ``temperature``, ``top_k``,
        ``generator``)."""
        ...

    def result_line(self, summary: dict[str, Any]) -> str | None:
        """``moekit train``: the finished run in one line (None without a validation loss)."""
        ...

    def eval_line(self, loss: float, accuracy: float | None) -> str:
        """``moekit eval``: the figures of one evaluation."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# the [moe] section, shared by the tasks


def parse_moe(
    values: dict[str, Any] | None, model: dict[str, Any], model_cls: type
) -> MoEConfig | SoftMoEConfig | None:
    """The typed ``[moe]`` section (None for a dense model): a :class:`SoftMoEConfig` with ``router = "soft"``,
    else a :class:`MoEConfig`. ``d_model``, ``d_ff`` and ``activation`` default to the ``[model]`` values (or the
    model config's defaults)."""
    if values is None:
        return None
    values = dict(values)
    for key in ("d_model", "d_ff", "activation"):
        values.setdefault(key, model.get(key, getattr(model_cls, key)))
    if values.get("router") == "soft":
        # Soft MoE has its own config: slots instead of top-k and capacity (docs/ALGORITHMS.md section 4).
        values.pop("router")
        for key in values:
            if key not in _SOFT_KEYS:
                raise ConfigError(
                    f"unknown config key 'moe.{key}' for moe.router = 'soft'{suggest(key, _SOFT_KEYS)}; "
                    f"valid keys: {', '.join(_SOFT_KEYS)}"
                )
        return config_from_dict(SoftMoEConfig, values, "moe")
    return config_from_dict(MoEConfig, values, "moe")


def moe_table(moe: MoEConfig | SoftMoEConfig) -> dict[str, Any]:
    """The ``[moe]`` table that :func:`parse_moe` reads back to ``moe``."""
    if isinstance(moe, SoftMoEConfig):
        return {"router": "soft", **dataclasses.asdict(moe)}
    return dataclasses.asdict(moe)


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise MoekitError("the prompt encodes to no tokens")
    return ids


def _refuse(task: Task, command: str, run_dir: Path) -> None:
    if command not in task.commands:
        kinds = {"lm": "language-model", "vit": "image-classifier", "seq2seq": "encoder-decoder"}
        works_on = [kinds.get(t.arch, t.arch) for t in TASKS.values() if command in t.commands]
        if not works_on:  # a caller's mistake, not the user's: keep the traceback
            raise ValueError(f"no task supports the command {command!r} (see RUN_COMMANDS)")
        raise MoekitError(
            f"{run_dir} is {task.title} (model.arch = {task.arch!r}) run; moekit {command} works on "
            f"{' and '.join(works_on)} runs"
        )


# ---------------------------------------------------------------------------------------------------------------
# language model


@dataclass
class PreparedData:
    """A language-model run's data: token ids of the training and validation splits, and the tokenizer."""

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    tokenizer_path: Path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The [data] values that determine a language model's prepared data (the corpus, its split, the tokenizer); the
# others (seq_len, cache_dir, the span-corruption rates) only change how the saved tokens are used. They are
# recorded in the token file's metadata, with the sha256 of the tokenizer the tokens were encoded with: data left
# behind by a start that failed before its first checkpoint is then never mistaken for the data of a retry with
# another [data] section (before, a retry with data.vocab_size = 400 reused a 300-token vocabulary silently).
_DATA_KEYS = ("corpus", "tokenizer", "vocab_size", "val_fraction", "piece_chars", "max_chars")
_RECORD_KEY = "moekit.data"


def _data_record(d: DataConfig, sentinels: int) -> dict[str, Any]:
    record = {key: getattr(d, key) for key in _DATA_KEYS}
    if d.tokenizer_file is not None:  # absent when unset, so the records of older runs still match
        record["tokenizer_file"] = d.tokenizer_file
    record["sentinels"] = sentinels
    return record


def _given_tokenizer(path: str, sentinels: int) -> Tokenizer:
    """``data.tokenizer_file``, checked for what the run needs of it: an end-of-text token to separate documents
    and, for span corruption, the sentinels at the ids a trained tokenizer gives them."""
    tok = load_tokenizer(Path(path).expanduser())
    if tok.token_to_id(EOT) is None:
        raise MoekitError(
            f"data.tokenizer_file {path} has no {EOT} token to end each document with (a tokenizer moekit trained, "
            "such as another run's tokenizer.json, has one)"
        )
    if sentinels:
        sentinel_ids(tok, sentinels)  # a one-line error naming the first sentinel missing
    return tok


def _record_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``data.vocab_size = 300 (now 400)`` for every recorded value that differs, in words."""
    keys = [k for k in now if saved.get(k) != now[k]] + [k for k in saved if k not in now]
    return ", ".join(f"data.{k} = {saved.get(k)!r} (now {now.get(k)!r})" for k in keys)


@dataclass
class _SavedTokens:
    train: np.ndarray
    val: np.ndarray
    record: dict[str, Any] | None  # None: written before records existed, or by import-hf


def _read_tokens(path: Path) -> _SavedTokens:
    """The token arrays of ``path`` and the [data] record in its metadata; a truncated, header-damaged or
    malformed file is a one-line :class:`MoekitError` naming it (never a safetensors traceback)."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            names = set(f.keys())
            missing = [name for name in ("train", "val") if name not in names]
            if missing:
                raise MoekitError(f"{path} has no {missing[0]!r} token array: it is damaged; restore it from a backup")
            train, val = f.get_tensor("train"), f.get_tensor("val")
    except MoekitError:
        raise
    except Exception as exc:  # safetensors raises its own error type (and OSError for an unreadable file)
        raise MoekitError(
            f"{path} cannot be read ({_first_line(exc)}): it is damaged; restore it from a backup"
        ) from None
    for name, ids in (("train", train), ("val", val)):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise MoekitError(
                f"{path}: its {name!r} array ({ids.dtype}, shape {tuple(ids.shape)}) is not a list of token ids: "
                "it is damaged; restore it from a backup"
            )
    record = None
    if _RECORD_KEY in metadata:
        try:
            record = json.loads(metadata[_RECORD_KEY])
            if not isinstance(record, dict):
                raise ValueError("not a table")
        except ValueError:
            raise MoekitError(f"{path}: its {_RECORD_KEY} metadata is damaged; restore it from a backup") from None
    return _SavedTokens(train, val, record)


def _check_token_range(tokens: _SavedTokens, path: Path, vocab_size: int, vocabulary: str) -> None:
    """Every id in ``[0, vocab_size)``: an id beyond the vocabulary would fail deep inside the model's embedding
    (or, within a padded table, train on rows no text maps to) instead of naming the damaged file."""
    for name, ids in (("train", tokens.train), ("val", tokens.val)):
        low, high = int(ids.min()), int(ids.max())
        bad = low if low < 0 else high if high >= vocab_size else None
        if bad is not None:
            raise MoekitError(
                f"{path}: token id {bad} in its {name!r} array is outside {vocabulary} (ids 0..{vocab_size - 1}): "
                "the file is damaged or was encoded with another tokenizer; restore it from a backup"
            )


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_data(
    run_config: RunConfig, run_dir: Path, log: Callable[[str], None], *, sentinels: int = 0
) -> PreparedData:
    """Reuse the run's tokenizer and token arrays when present; otherwise build them from the corpus (corpus ->
    split -> tokenizer -> token arrays) and save them in the run directory. ``sentinels``: T5 sentinel tokens the
    tokenizer gets (an encoder-decoder run's span corruption).

    Saved data is checked before it is used: a damaged token file, token ids outside the vocabulary, or a
    tokenizer that is not the one the tokens were encoded with are one-line errors naming the file. Data that
    records another ``[data]`` section than this config's is an error in a run (its checkpoints were trained on
    it); in a directory without ``config.toml`` (the leftovers of a start that failed before writing it) it is
    prepared again."""
    d = run_config.data
    tok_path = run_dir / TOKENIZER_FILE
    tokens_path = run_dir / TOKENS_FILE
    record = _data_record(d, sentinels)
    in_run = (run_dir / "config.toml").is_file()
    if tok_path.is_file() and tokens_path.is_file():
        data = _reuse_data(d, record, tok_path, tokens_path, in_run=in_run, log=log)
        if data is not None:
            return data
    else:
        missing = tokens_path if tok_path.is_file() else tok_path
        if d.tokenizer == "imported":
            raise MoekitError(
                f"{missing} is missing: the tokenizer and token ids of an imported model are never rebuilt "
                "(import the model again with moekit import-hf)"
            )
        if in_run:
            # An existing run (its config is written after its data): rebuilding from today's corpus would pair
            # its checkpoints with other data, silently. Only a new run builds the data.
            raise MoekitError(
                f"{missing} is missing: a run's saved data is never rebuilt from the corpus (its checkpoints were "
                "trained on it); restore it from a backup"
            )
    # Before reading the corpus and training the tokenizer: a directory that cannot take the result is reported
    # now, not after minutes of work.
    check_writable(run_dir)
    given = None if d.tokenizer_file is None else _given_tokenizer(d.tokenizer_file, sentinels)
    t0 = time.perf_counter()
    docs = load_corpus(d.corpus, d.cache_dir, max_chars=d.max_chars, log=log)
    pieces = cut_pieces(docs, d.piece_chars, d.max_chars)
    del docs  # the pieces hold the text now; a large corpus need not sit in memory twice
    train_pieces, val_pieces = split_pieces(pieces, d.val_fraction)
    n_chars = sum(len(t) for _, t, _ in pieces)
    if given is not None:
        tok = given
    else:
        if n_chars >= _LOG_STAGES_CHARS:
            log(f"corpus {d.corpus!r}: {n_chars:,} characters; training the tokenizer (vocabulary {d.vocab_size})")
        tok = train_tokenizer([text for _, text, _ in train_pieces], d.vocab_size, sentinels=sentinels)
    if n_chars >= _LOG_STAGES_CHARS:
        log(f"corpus {d.corpus!r}: encoding {len(pieces):,} pieces")
    train_tokens = encode_pieces(tok, train_pieces)
    val_tokens = encode_pieces(tok, val_pieces)
    log(
        f"corpus {d.corpus!r}: {n_chars:,} characters -> {len(train_tokens):,} training and"
        f" {len(val_tokens):,} validation tokens (vocabulary {tok.get_vocab_size()})"
        f" in {time.perf_counter() - t0:.1f}s"
    )
    _save_data(tok, train_tokens, val_tokens, record, tok_path, tokens_path)
    return PreparedData(train_tokens, val_tokens, tok.get_vocab_size(), tok_path)


# Corpora this large (about a minute of tokenizer training and more) say which stage they are in.
_LOG_STAGES_CHARS = 50_000_000


def _reuse_data(
    d: DataConfig,
    record: dict[str, Any],
    tok_path: Path,
    tokens_path: Path,
    *,
    in_run: bool,
    log: Callable[[str], None],
) -> PreparedData | None:
    """The saved data when it is this config's; None when it is the leftover of a failed start with another
    ``[data]`` (or of unknown origin) and no run depends on it: the caller prepares it again."""
    tokens = _read_tokens(tokens_path)
    tok_bytes = tok_path.read_bytes()
    saved = tokens.record
    if saved is not None:
        values = {k: v for k, v in saved.items() if k != "tokenizer_sha256"}
        if values != record:
            if in_run:
                raise MoekitError(
                    f"{tokens_path} was prepared for another [data] section than {tok_path.parent / 'config.toml'} "
                    f"holds ({_record_difference(values, record)}): the run's files do not belong together; "
                    "restore them from a backup"
                )
            log(
                f"{tokens_path.parent.parent}: discarding the data a failed start left for another [data] section "
                f"({_record_difference(values, record)}); preparing it again"
            )
            return None
        if saved.get("tokenizer_sha256") not in (None, _sha256_bytes(tok_bytes)):
            if in_run:
                raise MoekitError(
                    f"{tok_path} is not the tokenizer {tokens_path} was encoded with: the run's files do not "
                    "belong together; restore them from a backup"
                )
            log(f"{tok_path.parent}: the tokenizer a failed start left does not match its tokens; preparing both again")
            return None
    elif not in_run and d.tokenizer != "imported":
        # No record (written by an older moekit) and no run to say whose it is: it cannot be told apart from the
        # leftovers of a failed start with another [data]. Preparing it again costs time, never correctness.
        log(f"{tok_path.parent}: data without a record of its [data] section and no config.toml; preparing it again")
        return None
    try:
        tok = Tokenizer.from_str(tok_bytes.decode("utf-8"))
    except Exception as exc:  # a damaged file: one line naming it, not a parser's traceback
        raise MoekitError(f"{tok_path} cannot be read ({_first_line(exc)}): it is damaged") from None
    vocab = tok.get_vocab_size()
    if d.tokenizer == "imported":  # the model's table (data.vocab_size), often padded past its tokenizer's
        _check_token_range(tokens, tokens_path, d.vocab_size, "the model's vocabulary (data.vocab_size)")
    else:
        _check_token_range(tokens, tokens_path, vocab, f"the vocabulary of {tok_path.name}")
    return PreparedData(tokens.train, tokens.val, vocab, tok_path)


def _save_data(
    tok: Tokenizer,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    record: dict[str, Any],
    tok_path: Path,
    tokens_path: Path,
) -> None:
    """Write the token arrays (with the [data] record and the tokenizer's sha256) and then the tokenizer, each
    atomically. A stale tokenizer is removed first, so that no moment shows the new tokens beside the old
    tokenizer (the two are reused only together). A full or read-only disk is a one-line error naming the file,
    with no partial file left (:mod:`moekit.atomic`)."""
    tok_bytes = tok.to_str(pretty=True).encode("utf-8")  # what Tokenizer.save writes
    meta = {_RECORD_KEY: json.dumps({**record, "tokenizer_sha256": _sha256_bytes(tok_bytes)}, sort_keys=True)}
    # The run directory is created only now, once the corpus has loaded: bad input leaves nothing behind.
    data_dir = tokens_path.parent
    created, wrote_tokens = not data_dir.exists(), False
    try:
        make_dirs(data_dir)
        tok_path.unlink(missing_ok=True)
        # Serialised in memory and written by atomic_write_bytes, so that an I/O failure arrives as an OSError
        # with its errno (safetensors' own writer wraps it in a message).
        atomic_write_bytes(tokens_path, np_save({"train": train_tokens, "val": val_tokens}, metadata=meta))
        wrote_tokens = True
        atomic_write_bytes(tok_path, tok_bytes)
    except BaseException as exc:
        # A failed write leaves neither tokens without their tokenizer nor an empty data/ that looks like a start.
        with contextlib.suppress(OSError):
            if wrote_tokens:
                tokens_path.unlink()
            if created:
                data_dir.rmdir()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError) and is_disk_error(exc):
            raise WriteError(data_dir, exc) from None  # the mkdir or the unlink
        raise


class LanguageModelTask:
    """A causal :class:`~moekit.models.TransformerLM` on a tokenised text corpus.

    The typed ``[model]`` is an :class:`LMConfig` whose ``vocab_size`` is ``data.vocab_size``, the tokenizer's
    target; the model is built with the trained tokenizer's actual vocabulary (:meth:`model_for_data`).
    """

    arch = "lm"
    title = "a language model"
    unit = "token"
    model_config = LMConfig
    data_config = DataConfig
    data_files = (TOKENS_FILE, TOKENIZER_FILE)  # the tokenizer last: prepare_data reuses the two only together
    commands = frozenset(RUN_COMMANDS)
    model_keys = [f.name for f in dataclasses.fields(LMConfig) if f.name not in ("vocab_size", "moe")] + ["arch"]

    def parse_model(self, model: dict[str, Any], moe: dict[str, Any] | None, data: DataConfig) -> LMConfig:
        for key in model:
            if key not in self.model_keys:
                hint = " (it is set by the tokenizer: use data.vocab_size)" if key == "vocab_size" else ""
                raise ConfigError(
                    f"unknown config key 'model.{key}'{hint or suggest(key, self.model_keys)}; "
                    f"valid keys: {', '.join(self.model_keys)}"
                )
        if moe is not None and moe.get("router") == "soft":
            raise ConfigError(
                "moe.router = 'soft': Soft MoE mixes every token of a sequence into each slot, so a token would "
                "see its future: it is refused in the causal TransformerLM (use it with model.arch = 'vit')"
            )
        values = {k: v for k, v in model.items() if k != "arch"}
        values.setdefault("max_seq_len", data.seq_len)
        values.update(vocab_size=data.vocab_size, moe=parse_moe(moe, model, LMConfig))
        return config_from_dict(LMConfig, values, "model")

    def model_table(self, model: LMConfig) -> dict[str, Any]:
        table = dataclasses.asdict(model)
        del table["vocab_size"], table["moe"]
        return table

    def moe_of(self, model: LMConfig) -> MoEConfig | None:
        return model.moe

    def check(self, config: RunConfig) -> None:
        if config.data.seq_len > config.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({config.data.seq_len}) must be <= model.max_seq_len ({config.model.max_seq_len})"
            )

    def prepare(self, config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> PreparedData:
        return prepare_data(config, run_dir, log)

    def model_for_data(self, config: RunConfig, data: PreparedData) -> LMConfig:
        if config.data.tokenizer == "imported":  # the imported model's vocabulary, often padded past the tokenizer's
            return config.model
        return dataclasses.replace(config.model, vocab_size=data.vocab_size)

    def build_model(self, model_config: LMConfig) -> TransformerLM:
        return TransformerLM(model_config)

    def batches(self, config: RunConfig, data: PreparedData) -> TokenBatches:
        return TokenBatches(data.train_tokens, config.train.batch_size, config.data.seq_len, config.train.seed)

    def eval_data(self, config: RunConfig, data: PreparedData) -> TokenEvalData:
        return TokenEvalData(data.val_tokens, config.data.seq_len)

    def cost(self, model_config: LMConfig, config: RunConfig) -> ModelCost:
        counts = parameter_counts(model_config)
        flops = flops_per_token(model_config, config.data.seq_len)
        return ModelCost(counts["total"], counts["active"], flops["forward"], flops["train"], flops["train"])

    def batch_text(self, model_config: LMConfig, config: RunConfig) -> str:
        return f"{config.train.batch_size} x {config.data.seq_len} tokens"

    def baseline(self, config: RunConfig, data: PreparedData) -> dict[str, float]:
        train = config.train
        max_windows = None if train.eval_batches is None else train.eval_batches * train.batch_size
        unigram = unigram_cross_entropy(
            data.train_tokens, data.val_tokens, data.vocab_size, config.data.seq_len, max_windows
        )
        return {"unigram_val_loss": unigram}

    def final_metrics(self, result: TrainResult) -> dict[str, Any]:
        loss = result.final_val_loss
        # A diverged run's loss can pass ln(float max) = 709.78: its perplexity is inf, without numpy's warning.
        perplexity = None if loss is None else math.inf if loss > 709.0 else math.exp(loss)
        return {"final_val_perplexity": perplexity}

    def cost_figures(self, cost: ModelCost) -> dict[str, Any]:
        return {}

    def plot(self, run_dir: Path, baseline: dict[str, float]) -> list[Path]:
        return plot_run(run_dir, baseline.get("unigram_val_loss"))

    def units_per_row(self, config: RunConfig) -> int:
        return config.data.seq_len

    def loss_ceiling(self, config: RunConfig) -> float | None:
        # A freshly initialised model starts near ln(V), the loss of a uniform prediction (small init).
        return math.log(config.data.vocab_size)

    def require(self, command: str, run_dir: Path) -> None:
        _refuse(self, command, run_dir)

    def describe(self, config: RunConfig) -> tuple[str, list[str]]:
        lm = config.model
        cost = self.cost(lm, config)
        m = lm.moe
        kind = "dense" if m is None else f"MoE: {m.num_experts} experts, top-{m.top_k}, MoE blocks {lm.moe_layers()}"
        return kind, [
            f"parameters: {cost.parameters:,} total, {cost.active_parameters:,} active per token "
            f"(vocabulary {config.data.vocab_size} assumed)",
            f"FLOPs per token: {cost.forward_flops / 1e6:.2f} M forward, {cost.train_flops / 1e6:.2f} M training",
        ]

    def generate_text(self, model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any) -> str:
        # The prompt followed by its continuation.
        ids = _prompt_ids(tokenizer, prompt)
        out = model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens, **sampling)
        return tokenizer.decode(out.tolist())

    def result_line(self, summary: dict[str, Any]) -> str | None:
        val = summary["final_val_loss"]
        if val is None:
            return None
        return (
            f"validation loss {val:.3f} nats/token (perplexity {summary['final_val_perplexity']:.1f}); "
            f"unigram baseline {summary['unigram_val_loss']:.3f}; {summary['steps']} steps, "
            f"{summary['tokens_per_s']:.0f} tokens/s, {summary['wall_seconds_this_session']:.0f}s"
        )

    def eval_line(self, loss: float, accuracy: float | None) -> str:
        return f"validation loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}"


# ---------------------------------------------------------------------------------------------------------------
# image classifier


def prepare_images(run_config: RunConfig) -> ImageSplits:
    """The image set of a ViT run (``ImageSplits``), cut to ``data.train_examples`` / ``data.test_examples``,
    checked against the model's image size, channels and classes."""
    d = run_config.data
    splits = load_images(d.dataset)
    if d.train_examples is not None:
        splits.train_images = splits.train_images[: d.train_examples]
        splits.train_labels = splits.train_labels[: d.train_examples]
    if d.test_examples is not None:
        splits.test_images = splits.test_images[: d.test_examples]
        splits.test_labels = splits.test_labels[: d.test_examples]
    vit = run_config.model
    _, channels, height, width = tuple(splits.train_images.shape)
    if (height, width) != (vit.image_size, vit.image_size) or channels != vit.in_channels:
        raise MoekitError(
            f"data.dataset {d.dataset!r} holds {channels}-channel {height}x{width} images but the model expects "
            f"{vit.in_channels}-channel {vit.image_size}x{vit.image_size}: set model.image_size / model.in_channels"
        )
    top = int(max(int(splits.train_labels.max()), int(splits.test_labels.max())))
    if top >= vit.num_classes:
        raise MoekitError(
            f"data.dataset {d.dataset!r} has labels up to {top} but model.num_classes = {vit.num_classes}"
        )
    return splits


class ImageClassifierTask:
    """A :class:`~moekit.models.ViT` classifier on an image set held in memory (nothing is written to the run
    directory). A named set fixes the image geometry and the classes, so ``[model]`` may leave them out."""

    arch = "vit"
    title = "an image classifier"
    unit = "image"
    model_config = ViTConfig
    data_config = ImageDataConfig
    data_files: tuple[str, ...] = ()
    commands = frozenset({"eval"})
    model_keys = [f.name for f in dataclasses.fields(ViTConfig) if f.name != "moe"] + ["arch"]

    def parse_model(self, model: dict[str, Any], moe: dict[str, Any] | None, data: ImageDataConfig) -> ViTConfig:
        for key in model:
            if key not in self.model_keys:
                raise ConfigError(
                    f"unknown config key 'model.{key}'{suggest(key, self.model_keys)} (model.arch = 'vit'); "
                    f"valid keys: {', '.join(self.model_keys)}"
                )
        values = {k: v for k, v in model.items() if k != "arch"}
        shape = data.known_shape
        if shape is not None:  # a named set: the image geometry and the classes follow from it
            for key, value in zip(("image_size", "in_channels", "num_classes"), shape, strict=True):
                values.setdefault(key, value)
                if values[key] != value:
                    raise ConfigError(
                        f"model.{key} = {values[key]!r} but data.dataset = {data.dataset!r} has "
                        f"{key} {value}; leave model.{key} out (it follows from the data)"
                    )
        values["moe"] = parse_moe(moe, model, ViTConfig)
        return config_from_dict(ViTConfig, values, "model")

    def model_table(self, model: ViTConfig) -> dict[str, Any]:
        table = {"arch": self.arch, **dataclasses.asdict(model)}
        del table["moe"]
        return table

    def moe_of(self, model: ViTConfig) -> MoEConfig | SoftMoEConfig | None:
        return model.moe

    def check(self, config: RunConfig) -> None:
        pass  # the image geometry is checked against a named set when parsed, against the images when loaded

    def prepare(self, config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> ImageSplits:
        splits = prepare_images(config)
        log(
            f"data: {config.data.dataset}: {len(splits.train_labels):,} training and {len(splits.test_labels):,} "
            f"test images"
        )
        return splits

    def model_for_data(self, config: RunConfig, data: ImageSplits) -> ViTConfig:
        return config.model

    def build_model(self, model_config: ViTConfig) -> ViT:
        return ViT(model_config)

    def batches(self, config: RunConfig, data: ImageSplits) -> ImageBatches:
        return ImageBatches(data.train_images, data.train_labels, config.train.batch_size, config.train.seed)

    def eval_data(self, config: RunConfig, data: ImageSplits) -> ImageEvalData:
        return ImageEvalData(data.test_images, data.test_labels)

    def cost(self, model_config: ViTConfig, config: RunConfig) -> ModelCost:
        counts = vit_parameter_counts(model_config)
        flops = vit_flops_per_image(model_config)
        per_token = flops["train"] / model_config.num_tokens
        return ModelCost(counts["total"], counts["active"], flops["forward"], flops["train"], per_token)

    def batch_text(self, model_config: ViTConfig, config: RunConfig) -> str:
        return f"{config.train.batch_size} images of {model_config.num_tokens} tokens"

    def baseline(self, config: RunConfig, data: ImageSplits) -> dict[str, float]:
        # The accuracy of always answering the commonest training class: what a model that ignores the pixels gets.
        labels = np.asarray(data.train_labels)
        common = int(np.bincount(labels, minlength=config.model.num_classes).argmax())
        return {"majority_val_accuracy": float((np.asarray(data.test_labels) == common).mean())}

    def final_metrics(self, result: TrainResult) -> dict[str, Any]:
        return {"final_val_accuracy": result.final_val_accuracy}

    def cost_figures(self, cost: ModelCost) -> dict[str, Any]:
        return {"train_flops_per_image": cost.train_flops}

    def plot(self, run_dir: Path, baseline: dict[str, float]) -> list[Path]:
        return plot_run(run_dir)

    def units_per_row(self, config: RunConfig) -> int:
        return 1  # the trainer counts images

    def loss_ceiling(self, config: RunConfig) -> float | None:
        return None

    def require(self, command: str, run_dir: Path) -> None:
        _refuse(self, command, run_dir)

    def describe(self, config: RunConfig) -> tuple[str, list[str]]:
        vit = config.model
        cost = self.cost(vit, config)
        m = vit.moe
        if m is None:
            kind = "dense ViT"
        elif isinstance(m, SoftMoEConfig):
            kind = (
                f"Soft MoE ViT: {m.num_experts} experts x {m.slots_per_expert} slots, MoE blocks "
                f"{vit.moe_block_indices()}"
            )
        else:
            routing = "expert choice" if m.router == "expert_choice" else f"top-{m.top_k}"
            kind = f"MoE ViT: {m.num_experts} experts, {routing}, MoE blocks {vit.moe_block_indices()}"
        return f"{kind}; {vit.num_tokens} tokens per image", [
            f"parameters: {cost.parameters:,} total, {cost.active_parameters:,} active per token",
            f"FLOPs per image: {cost.forward_flops / 1e6:.2f} M forward, {cost.train_flops / 1e6:.2f} M training",
        ]

    def generate_text(self, model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any) -> str:
        raise MoekitError("an image classifier does not generate text")

    def result_line(self, summary: dict[str, Any]) -> str | None:
        val = summary["final_val_loss"]
        if val is None:
            return None
        return (
            f"test accuracy {summary['final_val_accuracy']:.4f} (loss {val:.3f} nats/image); majority-class "
            f"baseline {summary['majority_val_accuracy']:.4f}; {summary['steps']} steps, "
            f"{summary['tokens_per_s']:.0f} images/s, {summary['wall_seconds_this_session']:.0f}s"
        )

    def eval_line(self, loss: float, accuracy: float | None) -> str:
        return f"test accuracy {accuracy:.4f}, loss {loss:.4f} nats/image"


# ---------------------------------------------------------------------------------------------------------------
# the registry

# The encoder-decoder task builds on the language model's data functions above, so it is imported only now.
from moekit.lab.training.seq2seq_task import Seq2SeqTask  # noqa: E402

TASKS: dict[str, Task] = {task.arch: task for task in (LanguageModelTask(), ImageClassifierTask(), Seq2SeqTask())}
ARCHS = tuple(TASKS)


def task_for_arch(arch: object) -> Task:
    """The task of a ``model.arch`` value; a ValueError naming the choices for any other value."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {ARCHS}, got {arch!r}{suggest(str(arch), ARCHS)}")
    return TASKS[arch]


def task_of(model_config: object) -> Task:
    """The task whose ``[model]`` dataclass ``model_config`` is."""
    for task in TASKS.values():
        if isinstance(model_config, task.model_config):
            return task
    names = ", ".join(t.model_config.__name__ for t in TASKS.values())
    raise ConfigError(f"the [model] section must be one of {names}, got {type(model_config).__name__}")
