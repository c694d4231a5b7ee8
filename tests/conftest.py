"""Shared fixtures: every test starts from the same torch RNG state and a single thread, and the LM tests get a
tiny synthetic corpus (helpers in ``training/tiny_lm.py``).

One thread keeps the suite polite on a shared machine and makes float reductions reproducible run to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tiny_lm is imported by name from the training, command and distributed tests.
sys.path.insert(0, str(Path(__file__).resolve().parent / "training"))
from tiny_lm import write_tiny_corpus  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Seed torch's global RNG before each test, and restore the thread count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_tiny_corpus(tmp_path / "corpus.txt")
