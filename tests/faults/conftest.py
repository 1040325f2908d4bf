from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RunningStack, started

#: The fault stack's PRESENCE_TTL, seconds.
PRESENCE_TTL = 6


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of its own for the fault tests (they kill workers and restart Redis):
    2 replicas x 2 uvicorn workers, the smallest that has other workers and another replica.
    A short PRESENCE_TTL lets the presence test see a killed worker's sockets expire quickly."""
    with started(
        tmp_path_factory.mktemp("faults"), replicas=2, workers=2, PRESENCE_TTL=str(PRESENCE_TTL)
    ) as running:
        yield running
