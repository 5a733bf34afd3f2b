"""Shared fixtures. Modules that train tiny networks use ``pytestmark = pytest.mark.usefixtures("one_thread")``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-offs that cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
