"""Expert weights as one stacked bank, and the one feed-forward function experts and the dense FFN share."""

from moekit.experts.activations import ACTIVATIONS, GATED
from moekit.experts.bank import ExpertBank
from moekit.experts.ffn import feed_forward

__all__ = ["ACTIVATIONS", "GATED", "ExpertBank", "feed_forward"]
