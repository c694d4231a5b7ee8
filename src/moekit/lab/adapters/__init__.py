"""``moekit finetune``: multitask parameter-efficient fine-tuning of a Hugging Face model (needs ``transformers``),
its tasks and the grid of experiments. The adapters themselves are in the core :mod:`moekit.adapters`."""
