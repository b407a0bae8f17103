"""Shared test settings: deterministic, CPU-only, few threads."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
