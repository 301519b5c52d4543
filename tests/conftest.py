"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models and tensors: one torch thread is as fast as two on 2 cores, and far faster
    (often 5-10x) when other processes share the cores (OpenMP threads spin against each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
