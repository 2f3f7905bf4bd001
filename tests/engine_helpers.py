"""Shared by the engine tests (models, diffusion, device)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one thread: the tiny test models gain nothing from a second one, and when other jobs hold the other
    core, OpenMP barriers stall every small kernel for a scheduler tick (a 10x slowdown measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
