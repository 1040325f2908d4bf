from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

# Settings for in-process tests (unit and consumer tests). The e2e stacks get their own
# environment from tests/harness.py.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DJANGO_SECURE", "false")

from tests.harness import RunningStack, started

#: Room the long-idle watchers sit in (see tests/e2e/test_long_idle.py).
IDLE_ROOM = "idle-watch"
IDLE_WATCHERS = 4


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The default native stack, shared by the session: 3 replicas x 2 uvicorn workers, Redis.

    Tests must not disrupt it (kill workers, restart Redis): fault tests start their own.
    Right after start, a few websockets join IDLE_ROOM and stay silent for the whole session;
    the long-idle test, run last, checks they are still alive and still receive.
    """
    from websockets.sync.client import connect

    with started(tmp_path_factory.mktemp("stack")) as running, contextlib.ExitStack() as watchers:
        running.idle_watchers = [
            watchers.enter_context(
                connect(
                    running.ws_url + f"/ws/chat/{IDLE_ROOM}/",
                    ssl=running.sync_client_ssl_context(),
                    origin=running.origin,
                    open_timeout=10,
                )
            )
            for _ in range(IDLE_WATCHERS)
        ]
        running.idle_since = time.monotonic()
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``run_last`` run after everything else (stable order otherwise)."""
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)
