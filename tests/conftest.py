"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from evolve_fixtures import single_thread


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with torch on one thread (opt in with pytest.mark.usefixtures)."""
    with single_thread():
        yield
