"""Fixtures for the adapter tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def ids_BS() -> torch.Tensor:
    return torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
