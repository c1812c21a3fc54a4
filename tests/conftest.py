"""Shared fixtures: tiny configs that run in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config


@pytest.fixture(autouse=True)
def single_thread():
    """Every test: tiny tensors, where intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config():
    return tiny_config
