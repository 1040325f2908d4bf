"""Room history and recovery through nginx/TLS on the real stack (3 replicas x 2 workers).

A client that was away resumes with ``?since=<offset>&epoch=<epoch>`` and gets exactly what it
missed, in order, then ``{"type": "recovery", "recovered": true}``, then live messages: none
missed and none twice, including messages published while the replay runs. When the history
cannot cover the gap (another epoch, or trimmed), it says ``recovered: false`` and replays
nothing.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tests.harness import RunningStack, connections, recv_json, recv_until, room_path

pytestmark = pytest.mark.e2e

#: Messages one sender may send at once (CHAT_RATE_BURST).
BURST = 20


async def send_many(stack: RunningStack, room: str, count: int, tag: str) -> None:
    """``count`` messages from as many sockets as the per-connection burst needs."""
    senders = -(-count // BURST)
    async with connections(stack, room_path(room), senders) as sockets:
        for n in range(count):
            await sockets[n % senders].send(json.dumps({"message": f"{tag}{n}", "ref": tag}))
        for ws in sockets:  # each sender sees its own last message: all were accepted
            await recv_until(ws, lambda f: f.get("message") == f"{tag}{count - 1}", timeout=20)


async def latest(stack: RunningStack, room: str) -> tuple[int, str]:
    """The room's latest (offset, epoch), as a client joining with history=0 learns it."""
    async with await stack.connect(room_path(room) + "?history=0") as ws:
        frame = await recv_json(ws)
    assert frame["type"] == "recovery" and frame["recovered"] is True
    return frame["offset"], frame["epoch"]


async def test_resume_gets_exactly_what_was_missed_then_live_without_duplicates(
    stack: RunningStack,
) -> None:
    room = "recovery-resume"
    async with await stack.connect(room_path(room)) as away:
        await send_many(stack, room, 1, "before")
        seen = await recv_until(away, lambda f: f["type"] == "chat.message")
    since, epoch = seen["offset"], seen["epoch"]
    assert isinstance(since, int) and epoch

    await send_many(stack, room, 50, "missed")

    # Resume while more messages are being published: the replay and live delivery meet.
    resumed = await stack.connect(room_path(room) + f"?since={since}&epoch={epoch}")
    during = asyncio.create_task(send_many(stack, room, 20, "during"))
    frames = []
    try:
        while sum(f["type"] == "chat.message" for f in frames) < 70:
            frames.append(await recv_json(resumed, timeout=20))
    finally:
        await during
        with pytest.raises(TimeoutError):  # and nothing after them: no duplicate
            await recv_json(resumed, timeout=1)
        await resumed.close()

    (recovery_at,) = [i for i, f in enumerate(frames) if f["type"] == "recovery"]
    recovery = frames[recovery_at]
    assert recovery["recovered"] is True and recovery["epoch"] == epoch
    replayed = frames[:recovery_at]
    # Three senders on different workers: the room's order (offsets) is the order they were
    # accepted in, not necessarily the order they were sent in.
    assert sorted(f["message"] for f in replayed[:50]) == sorted(f"missed{n}" for n in range(50))
    messages = [f for f in frames if f["type"] == "chat.message"]
    offsets = [f["offset"] for f in messages]
    assert offsets == list(range(since + 1, since + 1 + len(offsets)))  # gap-free, none twice
    assert len(messages) == 70
    assert all(f["offset"] <= recovery["offset"] for f in replayed)
    assert all(f["offset"] > recovery["offset"] for f in frames[recovery_at + 1 :])
    # Replayed frames have the fields they had live.
    assert set(replayed[0]) >= {"id", "message", "user", "username", "room", "sent_by", "ref"}


async def test_a_gap_the_history_cannot_cover_is_reported_not_papered_over(
    stack: RunningStack,
) -> None:
    room = "recovery-lost"
    await send_many(stack, room, 5, "a")
    offset, epoch = await latest(stack, room)

    # Another epoch (e.g. Redis lost its data): recovered false, nothing replayed.
    async with await stack.connect(room_path(room) + "?since=1&epoch=0123abcd") as ws:
        frame = await recv_json(ws)
    assert frame == {"type": "recovery", "recovered": False, "epoch": epoch, "offset": offset}

    # Older than the history keeps (CHAT_HISTORY_SIZE = 200): recovered false, nothing replayed.
    await send_many(stack, room, 200, "b")
    async with await stack.connect(room_path(room) + f"?since=1&epoch={epoch}") as ws:
        frame = await recv_json(ws)
    assert frame["type"] == "recovery" and frame["recovered"] is False
    assert frame["offset"] == offset + 200

    # The client then reloads the recent history instead.
    async with await stack.connect(room_path(room) + "?history=100") as ws:
        frames = [await recv_json(ws) for _ in range(101)]
    assert [f["offset"] for f in frames[:100]] == list(range(offset + 101, offset + 201))
    assert frames[100] == {
        "type": "recovery",
        "recovered": True,
        "epoch": epoch,
        "offset": offset + 200,
    }


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("since=abc&epoch=x", "invalid_since"),
        ("since=-1&epoch=x", "invalid_since"),
        ("since=3", "invalid_since"),  # no epoch
        ("since=1&history=2", "invalid_since"),
        ("history=101", "invalid_history"),
        ("history=ten", "invalid_history"),
    ],
)
async def test_bad_recovery_requests_are_refused_clearly(
    stack: RunningStack, query: str, code: str
) -> None:
    async with await stack.connect(room_path("recovery-bad") + "?" + query) as ws:
        assert (await recv_json(ws))["code"] == code
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 4400


async def test_a_since_in_the_future_is_refused(stack: RunningStack) -> None:
    room = "recovery-future"
    await send_many(stack, room, 1, "x")
    offset, epoch = await latest(stack, room)
    async with await stack.connect(room_path(room) + f"?since={offset + 5}&epoch={epoch}") as ws:
        error = await recv_json(ws)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert error["code"] == "invalid_since" and closed.value.rcvd.code == 4400
