"""Notifications while Redis is down: stored ones are kept and replayed, pushes say why they fail.

A ``POST /notifications/`` stores the row, and the push happens after commit. With Redis down
that push cannot happen; the request must still say "stored" (201, ``"push": "deferred"``), never
an HTML 500 that makes a client retry and store the notification twice. The user's socket gets
it by replay once Redis is back. ``POST /notifications/ping/`` stores nothing: it answers 503 in
JSON.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.faults.tools import log_offsets, readyz, redis_client, unhandled_errors, wait_until
from tests.harness import RunningStack, recv_json

pytestmark = pytest.mark.e2e


def redis_answers(stack: RunningStack) -> bool:
    with contextlib.suppress(Exception):
        return bool(redis_client(stack).ping())
    return False


async def test_a_stored_notification_survives_redis_being_down(fault_stack: RunningStack) -> None:
    stack = fault_stack
    offsets = log_offsets(stack)
    gail = stack.login("gail")
    before = gail.get("/notifications/").json()["notifications"]
    since = max((n["id"] for n in before), default=0)
    try:
        stack.stack.supervisorctl("stop", "redis", check=True)
        assert not redis_answers(stack)

        stored = stack.csrf_post(gail, "/notifications/", {"message": "while redis was down"})
        assert stored.status_code == 201, stored.text
        assert stored.json()["push"] == "deferred"

        ping = stack.csrf_post(gail, "/notifications/ping/", {"message": "not storable"})
        assert ping.status_code == 503, ping.text
        assert ping.headers["content-type"] == "application/json"
        assert ping.json()["error"] == "unavailable"
        assert ping.headers["retry-after"] == "5"
    finally:
        stack.stack.supervisorctl("start", "redis", check=True)

    listed = gail.get("/notifications/").json()["notifications"]
    assert [n["message"] for n in listed if n["id"] > since] == ["while redis was down"]
    wait_until(lambda: set(readyz(stack)) == {200}, timeout=10)

    # The client reconnects from the last id it saw and gets the deferred one.
    async with await stack.connect(f"/ws/notifications/?since={since}", cookies=gail.cookies) as ws:
        replayed = await recv_json(ws)
    assert replayed["message"] == "while redis was down"
    assert replayed["data"] == {"notification_id": stored.json()["id"], "source": "replay"}
    assert unhandled_errors(stack, offsets) == []
