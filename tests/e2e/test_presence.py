"""Presence across every replica and worker process, through nginx/TLS.

Users with two sockets each, spread over the replicas, all see the same answer to
``{"type": "presence"}``; a user's first socket in sends ``presence.join`` to the room, their
last one out ``presence.leave``, their other sockets nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from tests.harness import RunningStack, recv_json, recv_until, replica_of, room_path

pytestmark = pytest.mark.e2e

ROOM = "presence-e2e"


async def ask_presence(ws) -> dict:
    await ws.send(json.dumps({"type": "presence"}))
    return await recv_until(ws, lambda f: f["type"] == "presence")


async def test_presence_is_the_same_from_every_process_and_events_are_per_user(
    stack: RunningStack,
) -> None:
    users = ["pia", "quinn", "rex"]
    jars = {user: stack.login(user).cookies for user in users}
    sockets = {
        user: [await stack.connect(room_path(ROOM), cookies=jars[user]) for _ in range(2)]
        for user in users
    }
    everyone = [ws for pair in sockets.values() for ws in pair]
    try:
        # Where each socket is served: one message, and every socket's delivered_by.
        await everyone[0].send(json.dumps({"message": "where are you", "ref": "where"}))
        served_by = [
            (await recv_until(ws, lambda f: f.get("ref") == "where"))["delivered_by"]
            for ws in everyone
        ]
        assert len({replica_of(p) for p in served_by}) >= 2, served_by

        expected_users = [{"user": user, "connections": 2} for user in users]
        answers = [await ask_presence(ws) for ws in everyone]
        for answer in answers:
            assert answer == {
                "type": "presence",
                "room": ROOM,
                "count": 6,
                "users": expected_users,
            }

        # A new user: one join for their first socket, nothing for the second (to sockets that
        # asked for presence, as all of these did above).
        sam = stack.login("sam").cookies
        first = await stack.connect(room_path(ROOM), cookies=sam)
        joined = [
            await recv_until(ws, lambda f: f["type"].startswith("presence.")) for ws in everyone
        ]
        assert all(j == {"type": "presence.join", "user": "sam", "room": ROOM} for j in joined)
        second = await stack.connect(room_path(ROOM), cookies=sam)
        assert (await ask_presence(everyone[0]))["count"] == 8
        await first.close()
        # The server runs the socket's leave just after the closing handshake: poll briefly.
        for _ in range(50):
            sams = (await ask_presence(everyone[0]))["users"][-1]
            if sams["connections"] == 1:
                break
            await asyncio.sleep(0.1)
        assert sams == {"user": "sam", "connections": 1}
        await second.close()
        left = await recv_until(everyone[0], lambda f: f["type"].startswith("presence."))
        assert left == {"type": "presence.leave", "user": "sam", "room": ROOM}
        assert (await ask_presence(everyone[0]))["count"] == 6
        # Exactly one event each way reached the room: after the join (read above), another
        # member saw only the leave -- no join for sam's second socket, no leave for the first.
        events = []
        with contextlib.suppress(TimeoutError):
            while True:
                frame = await recv_json(everyone[1], timeout=1)
                if frame["type"].startswith("presence."):
                    events.append(frame)
        assert events == [left]
    finally:
        await asyncio.gather(*(ws.close() for ws in everyone), return_exceptions=True)


async def test_old_clients_never_see_presence_events(stack: RunningStack) -> None:
    """A socket that never asked for presence (the tutorials' clients read every frame as a
    chat message) gets no presence.join/leave, only chat messages."""
    room = room_path("presence-old-client")
    async with await stack.connect(room) as old:
        async with await stack.connect(room) as newcomer:
            await newcomer.send(json.dumps({"message": "hello"}))
        frame = await recv_json(old)
        assert frame["type"] == "chat.message" and frame["message"] == "hello"
        with pytest.raises(TimeoutError):
            await recv_json(old, timeout=1)


async def test_presence_frames_answer_anonymous_sockets_too(stack: RunningStack) -> None:
    async with await stack.connect(room_path("presence-anon")) as ws:
        answer = await ask_presence(ws)
        assert answer["count"] == 1
        assert answer["users"] == [{"user": "anonymous", "connections": 1}]
        # A chat message still works on the same socket, and old-style frames are unchanged.
        await ws.send(json.dumps({"message": "hi"}))
        frame = await recv_json(ws)
        assert frame["type"] == "chat.message" and frame["message"] == "hi"  # no join of its own
