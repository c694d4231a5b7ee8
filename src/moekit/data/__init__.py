"""Data the trainer consumes: resumable shuffled token and image batches, T5 span-corruption batches for
encoder-decoder pre-training, and fixed evaluation data. Corpora, the tokenizer, the split and the image data set
readers are in :mod:`moekit.lab.data`."""

from moekit.data.batches import ShuffledOrder, TokenBatches, TokenEvalData, eval_windows, unigram_cross_entropy
from moekit.data.images import ImageBatches, ImageEvalData, image_eval_batches
from moekit.data.span_corruption import (
    Seq2SeqBatch,
    SpanCorruptionBatches,
    SpanCorruptionEvalData,
    random_spans_noise_mask,
    span_corrupt,
    span_corruption_lengths,
)

__all__ = [
    "ImageBatches",
    "ImageEvalData",
    "Seq2SeqBatch",
    "ShuffledOrder",
    "SpanCorruptionBatches",
    "SpanCorruptionEvalData",
    "TokenBatches",
    "TokenEvalData",
    "eval_windows",
    "image_eval_batches",
    "random_spans_noise_mask",
    "span_corrupt",
    "span_corruption_lengths",
    "unigram_cross_entropy",
]
