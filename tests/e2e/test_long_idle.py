"""Websockets idle for minutes stay up through nginx and still receive group messages.

nginx's default proxy_read_timeout (60 s) would cut them; our nginx allows an hour and the
workers ping idle sockets every WS_PING_INTERVAL seconds. The idle-period read of the channel
layer also crosses redis-py 8's 5 s socket timeout many times (see config/channel_layers.py).
The watchers joined when the shared stack started (tests/conftest.py); this test runs last, so
the wait below is only what the rest of the session did not already spend.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import IDLE_ROOM
from tests.harness import RunningStack

pytestmark = [pytest.mark.e2e, pytest.mark.run_last]

#: Issue 5 asks for 3 minutes (issue 2 for 75 s); a margin over the 60 s nginx default either way.
IDLE_SECONDS = 185


def test_websockets_idle_for_minutes_still_receive(stack: RunningStack) -> None:
    remaining = IDLE_SECONDS - (time.monotonic() - stack.idle_since)
    if remaining > 0:
        time.sleep(remaining)
    idle_for = time.monotonic() - stack.idle_since
    assert idle_for >= IDLE_SECONDS

    from websockets.sync.client import connect

    with connect(
        stack.ws_url + f"/ws/chat/{IDLE_ROOM}/",
        ssl=stack.sync_client_ssl_context(),
        origin=stack.origin,
    ) as sender:
        sender.send(json.dumps({"message": "still there?"}))
        for ws in stack.idle_watchers:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["message"] == "still there?"
    print(
        f"\n{len(stack.idle_watchers)} websockets idle {idle_for:.0f} s through nginx: all received"
    )
