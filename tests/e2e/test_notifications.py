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


def store_silently(stack: RunningStack, username: str, count: int) -> list[int]:
    """Store ``count`` notifications for ``username`` without pushing them (as if they were
    sent while the user was away); returns their ids, oldest first."""
    script = (
        "from django.contrib.auth import get_user_model; "
        "from notifications.models import Notification; "
        f"u = get_user_model().objects.get(username={username!r}); "
        "Notification.objects.bulk_create("
        f"Notification(user=u, kind='info', message=f'missed {{i}}') for i in range({count})); "
        "print('ids:', *Notification.objects.filter(user=u).order_by('pk')"
        ".values_list('pk', flat=True))"
    )
    output = stack.manage("shell", "-c", script).stdout
    (line,) = [line for line in output.splitlines() if line.startswith("ids:")]
    return [int(pk) for pk in line.split()[1:]]


async def test_replay_pages_until_caught_up_and_says_when_more_remain(
    stack: RunningStack,
) -> None:
    """1,050 stored while away: the first connect replays 1,000 in order, then says where to
    resume; the second replays the other 50 and nothing more. None skipped, none twice."""
    dora = stack.login("dora")
    stored = store_silently(stack, "dora", 1050)
    assert len(stored) == 1050

    async with await stack.connect("/ws/notifications/?since=0", cookies=dora.cookies) as ws:
        first = [await recv_json(ws) for _ in range(1000)]
        more = await recv_json(ws)
    assert [f["data"]["notification_id"] for f in first] == stored[:1000]
    assert {f["data"]["source"] for f in first} == {"replay"}
    assert more["type"] == "replay.more"
    assert more["since"] == stored[999]

    async with await stack.connect(
        f"/ws/notifications/?since={more['since']}", cookies=dora.cookies
    ) as ws:
        rest = [await recv_json(ws) for _ in range(50)]
        with pytest.raises(TimeoutError):
            await recv_json(ws, timeout=1)  # no replay.more, no duplicate
    assert [f["data"]["notification_id"] for f in rest] == stored[1000:]


async def test_a_live_push_of_a_replayed_notification_is_not_delivered_twice(
    stack: RunningStack,
) -> None:
    """The socket joins the user's group before it replays, so a push issued while the replay
    runs waits behind it; if the replay already sent that notification, the push is dropped."""
    erin = stack.login("erin")
    (stored_id,) = store_silently(stack, "erin", 1)
    async with await stack.connect(
        f"/ws/notifications/?since={stored_id - 1}", cookies=erin.cookies
    ) as ws:
        replayed = await recv_json(ws)
        assert replayed["data"] == {"notification_id": stored_id, "source": "replay"}
        # The post_save push of that same row, arriving after the replay.
        push_again = (
            "from django.contrib.auth import get_user_model; "
            "from notifications.publish import notify_user; "
            "u = get_user_model().objects.get(username='erin'); "
            f"notify_user(u.pk, 'missed 0', data={{'notification_id': {stored_id}, "
            "'source': 'post_save'})"
        )
        await asyncio.to_thread(stack.manage, "shell", "-c", push_again)
        response = stack.csrf_post(erin, "/notifications/", {"message": "new one"})
        assert response.status_code == 201, response.text
        assert response.json()["push"] == "sent"
        live = await recv_json(ws)
    assert live["message"] == "new one"  # the duplicate push never came before it
    assert live["data"] == {"notification_id": response.json()["id"], "source": "post_save"}


def test_json_endpoints_answer_errors_in_json(stack: RunningStack) -> None:
    anonymous = stack.http()
    for path in ("/notifications/", "/notifications/ping/"):
        response = anonymous.post(path, data={"message": "x"})
        assert response.status_code in {401, 403}, response.text  # CSRF runs first on POST
        assert response.headers["content-type"] == "application/json"
    response = anonymous.get("/notifications/")
    assert (response.status_code, response.json()["error"]) == (401, "auth_required")

    fay = stack.login("fay")
    fay.get("/chat/lobby/")  # sets the csrftoken cookie
    response = fay.post("/notifications/", data={"message": "no token"})  # no CSRF token
    assert (response.status_code, response.json()["error"]) == (403, "csrf_failed")
    response = fay.put(
        "/notifications/",
        headers={"X-CSRFToken": fay.cookies["csrftoken"], "Referer": f"{stack.base_url}/"},
    )
    assert (response.status_code, response.json()["error"]) == (405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    response = stack.csrf_post(fay, "/notifications/", {"message": ""})
    assert response.status_code == 400
    assert "error" in response.json()
