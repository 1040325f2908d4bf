"""Per-user notifications from sync code (view, post_save signal, management command in another
OS process) reach every socket of that user on every replica, through nginx/TLS."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from tests.harness import RunningStack, connections, recv_json, replica_of

pytestmark = pytest.mark.e2e

SOCKETS = 6


async def test_three_sync_paths_reach_all_of_a_users_sockets_on_every_replica(
    stack: RunningStack,
) -> None:
    alice = stack.login("alice")
    bob = stack.login("bob")
    async with (
        connections(stack, "/ws/notifications/", SOCKETS, cookies=alice.cookies) as mine,
        connections(stack, "/ws/notifications/", 1, cookies=bob.cookies) as bobs,
    ):
        sources = {}

        response = stack.csrf_post(alice, "/notifications/ping/", {"message": "from a view"})
        assert response.status_code == 202, response.text
        sources["view"] = "from a view"

        response = stack.csrf_post(alice, "/notifications/", {"message": "from a signal"})
        assert response.status_code == 201, response.text
        sources["post_save"] = "from a signal"

        result = await asyncio.to_thread(stack.manage, "notify", "alice", "from a command")
        assert result.stdout.startswith("sent ")
        sources["command"] = "from a command"

        received = [[await recv_json(ws) for _ in sources] for ws in mine]
        for frames in received:
            assert sorted(f["message"] for f in frames) == sorted(sources.values())
            assert {f["data"].get("source") for f in frames} == set(sources)
            assert len({f["delivered_by"] for f in frames}) == 1
        holders = {frames[0]["delivered_by"] for frames in received}
        assert len({replica_of(p) for p in holders}) >= 2, holders

        command_frames = [
            f for frames in received for f in frames if f["data"]["source"] == "command"
        ]
        worker_processes = holders
        assert all(f["sent_by"] not in worker_processes for f in command_frames)

        # Bob's socket got none of Alice's notifications.
        with pytest.raises(TimeoutError):
            await recv_json(bobs[0], timeout=1)

    listed = alice.get("/notifications/").json()["notifications"]
    assert [n["message"] for n in listed] == ["from a signal"]

    # A client that was away replays what was stored since the last id it saw.
    since = listed[0]["id"] - 1
    async with await stack.connect(
        f"/ws/notifications/?since={since}", cookies=alice.cookies
    ) as ws:
        replayed = await recv_json(ws)
    assert replayed["message"] == "from a signal"
    assert replayed["data"] == {"notification_id": listed[0]["id"], "source": "replay"}


async def test_anonymous_users_are_refused_clearly(stack: RunningStack) -> None:
    async with await stack.connect("/ws/notifications/") as ws:
        assert (await recv_json(ws))["code"] == "auth_required"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 4401


async def test_logout_closes_that_sessions_notification_sockets(stack: RunningStack) -> None:
    carol = stack.login("carol")
    async with connections(stack, "/ws/notifications/", 3, cookies=carol.cookies) as sockets:
        response = stack.csrf_post(carol, "/accounts/logout/", {})
        assert response.status_code == 302
        for ws in sockets:
            assert (await recv_json(ws))["code"] == "logged_out"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 4401
