"""Shared fixtures: every test starts from the same torch RNG state and a single thread.

One thread keeps the suite polite on a shared machine and makes float reductions reproducible run to run.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    """Seed torch's global RNG before each test, and restore the thread count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
