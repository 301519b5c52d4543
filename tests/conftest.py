"""Shared test set-up."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`opt_in` tests (minutes long) run only with PROGDISTILL_SLOW=1."""
    if os.environ.get("PROGDISTILL_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="minutes long: run with PROGDISTILL_SLOW=1")
    for item in items:
        if "opt_in" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models and tensors: one torch thread is as fast as two on 2 cores, and far faster
    (often 5-10x) when other processes share the cores (OpenMP threads spin against each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
