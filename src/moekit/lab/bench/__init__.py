"""Benchmarks shipped with the package, so that ``moekit bench`` works from an installed copy."""
