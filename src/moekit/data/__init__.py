"""Data: text corpora, the byte-level BPE tokenizer, the fixed split and resumable batches; image data sets for the
ViT."""

from moekit.data.batches import TokenBatches, eval_windows, unigram_cross_entropy
from moekit.data.config import DataConfig
from moekit.data.corpus import load_corpus
from moekit.data.images import ImageBatches, ImageSplits, image_eval_batches, load_images, read_idx
from moekit.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "ImageBatches",
    "ImageSplits",
    "TokenBatches",
    "eval_windows",
    "image_eval_batches",
    "load_corpus",
    "load_images",
    "load_tokenizer",
    "read_idx",
    "train_tokenizer",
    "unigram_cross_entropy",
]
