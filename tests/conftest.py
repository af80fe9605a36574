"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# Fixtures that several modules use, registered here once rather than imported by name in each module.
from pg_harness import postgres  # noqa: F401 - a session's PostgreSQL server (tests/pg_harness.py)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: pytest-xdist already keeps both cores busy, and timings stay stable."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
