"""Data: text corpora, the byte-level BPE tokenizer, the fixed split and resumable batches."""

from moekit.data.batches import TokenBatches, eval_windows, unigram_cross_entropy
from moekit.data.config import DataConfig
from moekit.data.corpus import load_corpus
from moekit.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "TokenBatches",
    "eval_windows",
    "load_corpus",
    "load_tokenizer",
    "train_tokenizer",
    "unigram_cross_entropy",
]
