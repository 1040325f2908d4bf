"""What other code sends a consumer, and how a consumer ends, cannot hurt the room: malformed
internal events are dropped at the boundary, a crashed consumer leaves no group membership and
no mailbox. In-process (``channels.testing``), against real Redis, once per Redis-backed layer.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import path

from chat.routing import websocket_urlpatterns
from realtime.consumers import GroupMemberConsumer
from realtime.events import DROPPED_EVENTS, KINDS_KEPT, DroppedEvents
from tests.unit.layer_probe import group_members_in_redis, messages_held_for

pytestmark = pytest.mark.usefixtures("layer_on_redis")

chat = URLRouter(websocket_urlpatterns)

VALID = {
    "type": "chat.message",
    "id": "a1",
    "message": "valid",
    "user": "service",
    "room": "boundary",
    "sent_by": "elsewhere:1",
}


async def member(room: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(chat, f"/ws/chat/{room}/")
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return communicator


def without(name: str) -> dict[str, Any]:
    return {key: value for key, value in VALID.items() if key != name}


@pytest.mark.parametrize(
    "event",
    [
        without("id"),
        without("user"),
        without("message"),
        without("room"),
        without("sent_by"),
        {**VALID, "message": None},
        {**VALID, "id": 7},
        {**VALID, "ref": {"not": "a string"}},
        {**VALID, "type": 42},
        {key: value for key, value in VALID.items() if key != "type"},
    ],
    ids=[
        "no-id",
        "no-user",
        "no-message",
        "no-room",
        "no-sent_by",
        "message-null",
        "id-int",
        "ref-dict",
        "type-int",
        "no-type",
    ],
)
async def test_a_malformed_internal_event_is_dropped_and_the_room_stays(
    event: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The example of the issue: a view sends ``chat.message`` without ``id`` or ``user``; it
    used to kill every member's consumer (KeyError, close 1011)."""
    first, second = await member("boundary"), await member("boundary")
    dropped_before = DROPPED_EVENTS.total
    with caplog.at_level(logging.WARNING, logger="switchboard.ws"):
        await get_channel_layer().group_send("chat.boundary", event)
        await get_channel_layer().group_send("chat.boundary", VALID)
        frames = [await c.receive_json_from(timeout=10) for c in (first, second)]
    # Each member got the valid event only, and is still connected: it can send and receive.
    assert [f["message"] for f in frames] == ["valid", "valid"]
    await first.send_json_to({"message": "still here"})
    for communicator in (first, second):
        assert (await communicator.receive_json_from(timeout=10))["message"] == "still here"
    assert await first.receive_nothing(timeout=0.2) and await second.receive_nothing(timeout=0)
    # Both copies were counted; the log says so at most once (not once per member).
    assert DROPPED_EVENTS.total == dropped_before + 2
    logged = [r for r in caplog.records if "internal" in r.getMessage()]
    assert len(logged) <= 1, [r.getMessage() for r in logged]
    await first.disconnect()
    await second.disconnect()


class Fragile(GroupMemberConsumer):
    """Joins one group; raises on an ``explode`` event and on any frame, as a bug would."""

    #: name (query string) -> channel name, so that a test can address one instance.
    channels: dict[str, str] = {}

    async def connect(self) -> None:
        await self.join("fragile")
        await self.accept()
        self.channels[self.scope["query_string"].decode()] = self.channel_name

    async def explode(self, event: dict[str, Any]) -> None:
        raise RuntimeError("a bug in an event handler")

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        raise RuntimeError("a bug in a frame handler")


fragile = URLRouter([path("ws/fragile/", Fragile.as_asgi())])


@pytest.mark.parametrize("crash", ["event", "frame"])
async def test_a_crashed_consumer_leaves_no_membership_and_no_mailbox(
    redis_url: str, crash: str
) -> None:
    layer = get_channel_layer()
    survivor = WebsocketCommunicator(fragile, "/ws/fragile/?survivor")
    victim = WebsocketCommunicator(fragile, "/ws/fragile/?victim")
    for communicator in (survivor, victim):
        connected, _ = await communicator.connect(timeout=10)
        assert connected
    channel = Fragile.channels["victim"]
    if crash == "event":
        await layer.send(channel, {"type": "explode"})
    else:
        await victim.send_to(text_data="boom")
    with pytest.raises(RuntimeError, match=r"a bug in an? \w+ handler"):
        await victim.wait(timeout=10)
    # The survivor is still a member; once it leaves, nothing is left of either of them.
    assert await group_members_in_redis(layer, redis_url, "fragile") == 1
    await survivor.disconnect()
    assert await group_members_in_redis(layer, redis_url, "fragile") == 0
    for _ in range(3):
        await layer.group_send("fragile", {"type": "explode"})
    assert await messages_held_for(layer, redis_url, channel) == 0


def test_dropped_events_are_logged_once_per_kind_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dropped = DroppedEvents()
    with caplog.at_level(logging.WARNING, logger="switchboard.ws"):
        for _ in range(1000):  # one bad event reaching a room of 1,000
            dropped.drop("chat.message", "no 'id'")
        dropped.drop("order.created", "no handler for this type")
        for n in range(KINDS_KEPT * 3):  # endless new types: memory stays bounded
            dropped.drop(f"kind-{n}", "no handler for this type")
    assert dropped.total == 1000 + 1 + KINDS_KEPT * 3
    lines = [r.getMessage() for r in caplog.records]
    assert sum("'chat.message'" in line for line in lines) == 1
    assert sum("'order.created'" in line for line in lines) == 1
    assert len(dropped._logged_at) <= KINDS_KEPT and len(dropped._unlogged) <= KINDS_KEPT
