"""``python -m moekit`` works like the ``moekit`` command (and under ``torchrun -m moekit``)."""

from moekit.lab.cli import entry

entry()
