"""Hot kernels: a pure-torch reference and faster paths behind the same signature."""

from moekit.ops.grouped_mm import (
    BACKENDS,
    grouped_mm,
    grouped_mm_padded,
    grouped_mm_reference,
    has_fast_grouped_mm,
    pick_backend,
)

__all__ = ["BACKENDS", "grouped_mm", "grouped_mm_padded", "grouped_mm_reference", "has_fast_grouped_mm", "pick_backend"]
