from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RunningStack, started


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The default native stack: 3 replicas x 2 uvicorn workers, Redis channel layer."""
    with started(tmp_path_factory.mktemp("stack")) as running:
        yield running
