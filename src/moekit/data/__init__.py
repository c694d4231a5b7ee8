"""Data the trainer consumes: resumable shuffled token and image batches and fixed evaluation data. Corpora, the
tokenizer, the split and the image data set readers are in :mod:`moekit.lab.data`."""

from moekit.data.batches import ShuffledOrder, TokenBatches, TokenEvalData, eval_windows, unigram_cross_entropy
from moekit.data.images import ImageBatches, ImageEvalData, image_eval_batches

__all__ = [
    "ImageBatches",
    "ImageEvalData",
    "ShuffledOrder",
    "TokenBatches",
    "TokenEvalData",
    "eval_windows",
    "image_eval_batches",
    "unigram_cross_entropy",
]
