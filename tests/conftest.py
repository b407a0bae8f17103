"""Shared test settings: deterministic, CPU-only, few threads."""

import os

import pytest
import torch

os.environ.setdefault("ESREID_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
