"""Data preparation for the runs: text corpora (built-in, downloaded, files), the byte-level BPE tokenizer, the
fixed train / validation split, the quality filter, the ``[data]`` config section and the image data set readers
(IDX, Fashion-MNIST, digits)."""

from moekit.lab.data.config import DataConfig
from moekit.lab.data.corpus import load_corpus
from moekit.lab.data.images import ImageSplits, load_images, read_idx
from moekit.lab.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "ImageSplits",
    "load_corpus",
    "load_images",
    "load_tokenizer",
    "read_idx",
    "train_tokenizer",
]
