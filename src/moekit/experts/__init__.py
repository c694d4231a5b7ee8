"""Expert weights as one stacked bank, and the dense FFN with the same math as one expert."""

from moekit.experts.activations import ACTIVATIONS, GATED
from moekit.experts.bank import ExpertBank

__all__ = ["ACTIVATIONS", "GATED", "ExpertBank"]
