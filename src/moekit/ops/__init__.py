"""Hot kernels: a pure-torch reference and faster paths behind the same signature."""

from moekit.ops.grouped_mm import grouped_mm, grouped_mm_reference, has_fast_grouped_mm

__all__ = ["grouped_mm", "grouped_mm_reference", "has_fast_grouped_mm"]
