"""``python -m moekit`` works like the ``moekit`` command (and under ``torchrun -m moekit``)."""

import sys

from moekit.lab.cli import main

sys.exit(main())
