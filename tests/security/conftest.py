from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RunningStack, started


@pytest.fixture(scope="package")
def limits_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A small stack of its own (1 replica x 1 worker) for what the shared stack must not see:
    nginx limits lowered and reloaded, floods, and logs read from their first line."""
    with started(tmp_path_factory.mktemp("limits"), replicas=1, workers=1) as running:
        yield running
