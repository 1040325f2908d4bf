from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RunningStack, started

#: Seconds a connection token lives on the browser stack.
TOKEN_TTL = 8


@pytest.fixture(scope="package")
def browser_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of its own (the test kills a worker): 1 replica x 2 uvicorn workers, so the page
    whose worker dies has another worker to come back to. Connection tokens live 8 s (notice at
    4 s), so that the clients without a browser refresh theirs while they are tested."""
    with started(
        tmp_path_factory.mktemp("browser"),
        replicas=1,
        workers=2,
        WS_TOKEN_TTL=str(TOKEN_TTL),
        WS_TOKEN_REFRESH_NOTICE="4",
    ) as running:
        yield running
