"""A worker is SIGKILLed: its sockets leave the room's presence by expiry, within PRESENCE_TTL.

The dead process runs no cleanup, so nothing removes its entries: the other workers stop seeing
them once they are no longer refreshed. The test kills the worker that serves some of a room's
members and measures how long presence, asked from a socket on another worker, takes to show
only the survivors.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from tests.faults.conftest import PRESENCE_TTL
from tests.faults.tools import pid_of, record_figures
from tests.harness import RunningStack, recv_until, room_path

pytestmark = pytest.mark.e2e

ROOM = "presence-kill"
SOCKETS = 8


async def test_killed_workers_sockets_leave_presence_within_the_ttl(
    fault_stack: RunningStack,
) -> None:
    stack = fault_stack
    sockets = [await stack.connect(room_path(ROOM)) for _ in range(SOCKETS)]
    try:
        await sockets[0].send(json.dumps({"message": "where", "ref": "where"}))
        served_by = [
            (await recv_until(ws, lambda f: f.get("ref") == "where"))["delivered_by"]
            for ws in sockets
        ]
        victim = max(set(served_by), key=served_by.count)
        survivors = [ws for ws, p in zip(sockets, served_by, strict=True) if p != victim]
        assert survivors, f"every socket on {victim}: cannot observe from another worker"
        asker = survivors[0]
        await asker.send(json.dumps({"type": "presence"}))
        assert (await recv_until(asker, lambda f: f["type"] == "presence"))["count"] == SOCKETS

        os.kill(pid_of(victim), signal.SIGKILL)
        killed_at = time.monotonic()
        limit = PRESENCE_TTL + 5
        while True:
            await asker.send(json.dumps({"type": "presence"}))
            answer = await recv_until(asker, lambda f: f["type"] == "presence")
            converged = time.monotonic() - killed_at
            if answer["count"] == len(survivors):
                break
            assert converged < limit, f"presence still lists {answer['count']} after {limit} s"
            await asyncio.sleep(0.25)
        assert answer["users"] == [{"user": "anonymous", "connections": len(survivors)}]
        record_figures(
            "presence_after_worker_kill",
            {
                "presence_ttl_s": PRESENCE_TTL,
                "sockets": SOCKETS,
                "sockets_on_killed_worker": SOCKETS - len(survivors),
                "converged_after_kill_s": round(converged, 2),
            },
        )
        # The survivors are still in the room and still get messages.
        await asker.send(json.dumps({"message": "after", "ref": "after"}))
        for ws in survivors:
            assert (await recv_until(ws, lambda f: f.get("ref") == "after"))["message"] == "after"
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
