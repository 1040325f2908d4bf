from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RunningStack, started


@pytest.fixture(scope="package")
def browser_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of its own (the test kills a worker): 1 replica x 2 uvicorn workers, so the page
    whose worker dies has another worker to come back to."""
    with started(tmp_path_factory.mktemp("browser"), replicas=1, workers=2) as running:
        yield running
