"""ChatConsumer through Channels' WebsocketCommunicator, against a real redis-server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from chat.routing import websocket_urlpatterns
from tests.unit.layer_probe import group_members_in_redis

pytestmark = pytest.mark.usefixtures("layer_on_redis")

app = URLRouter(websocket_urlpatterns)


async def joined(room: str = "lobby") -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(app, f"/ws/chat/{room}/")
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return communicator


async def error_for(frame: str) -> dict:
    communicator = await joined()
    try:
        # send_input, not send_to: send_to refuses an empty text frame on the client side.
        await communicator.send_input({"type": "websocket.receive", "text": frame})
        reply = await communicator.receive_json_from(timeout=10)
        assert reply["type"] == "error"
        assert reply["detail"]
        # The connection stays open: a valid message still goes through afterwards.
        await communicator.send_json_to({"message": "still here"})
        after = await communicator.receive_json_from(timeout=10)
        assert after["type"] == "chat.message" and after["message"] == "still here"
        return reply
    finally:
        await communicator.disconnect()


async def test_message_reaches_every_member_with_all_protocol_fields() -> None:
    first, second = await joined(), await joined()
    await first.send_json_to({"message": "hello", "ref": "r-1"})
    frames = [await c.receive_json_from(timeout=10) for c in (first, second)]
    for frame in frames:
        assert frame["type"] == "chat.message"
        assert frame["message"] == "hello"
        assert frame["user"] == "anonymous" == frame["username"]
        assert frame["room"] == "lobby"
        assert frame["ref"] == "r-1"
        assert frame["sent_by"].endswith(f":{__import__('os').getpid()}")
        assert frame["delivered_by"]
    assert frames[0]["id"] == frames[1]["id"]
    await first.send_json_to({"message": "no ref"})
    frame = await first.receive_json_from(timeout=10)
    assert "ref" not in frame and frame["id"] != frames[0]["id"]
    await first.disconnect()
    await second.disconnect()


async def test_seed_client_frame_shape_is_served() -> None:
    """Seed clients send {"message": ...} and read data.message, data.user, data.username."""
    communicator = await joined("general")
    await communicator.send_to(text_data=json.dumps({"message": "hi"}))
    frame = await communicator.receive_json_from(timeout=10)
    assert (frame["message"], frame["user"], frame["username"]) == ("hi", "anonymous", "anonymous")
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("", "invalid_json"),
        ("[1, 2]", "not_an_object"),
        ('"message"', "not_an_object"),
        ("{}", "missing_message"),
        ('{"text": "hi"}', "missing_message"),
        ('{"message": 42}', "invalid_message"),
        ('{"message": null}', "invalid_message"),
        ('{"message": ["a"]}', "invalid_message"),
        ('{"message": ""}', "empty_message"),
        ('{"message": "   "}', "empty_message"),
        ('{"message": "hi", "ref": 7}', "invalid_ref"),
        ('{"message": "hi", "ref": "' + "r" * 65 + '"}', "invalid_ref"),
    ],
)
async def test_rejected_messages_get_a_stable_error_code(frame: str, code: str) -> None:
    assert (await error_for(frame))["code"] == code


async def test_message_over_the_character_limit_is_rejected() -> None:
    with override_settings(CHAT_MAX_MESSAGE_CHARS=10):
        assert (await error_for('{"message": "' + "x" * 11 + '"}'))["code"] == "message_too_long"


async def test_binary_frames_are_rejected() -> None:
    communicator = await joined()
    await communicator.send_to(bytes_data=b'{"message": "hi"}')
    reply = await communicator.receive_json_from(timeout=10)
    assert reply["code"] == "binary_not_supported"
    await communicator.disconnect()


async def test_flood_past_the_rate_gets_rate_limited_and_the_rest_is_delivered() -> None:
    with override_settings(CHAT_RATE_PER_SECOND=1, CHAT_RATE_BURST=3):
        communicator = await joined("flood")
        for i in range(5):
            await communicator.send_json_to({"message": f"m{i}"})
        frames = [await communicator.receive_json_from(timeout=10) for _ in range(5)]
        await communicator.disconnect()
    delivered = [f["message"] for f in frames if f["type"] == "chat.message"]
    limited = [f for f in frames if f["type"] == "error"]
    assert delivered == ["m0", "m1", "m2"]
    assert [f["code"] for f in limited] == ["rate_limited", "rate_limited"]


@pytest.mark.parametrize("room", ["a" * 65, "bad.name", "spaces here", "ünï", "a%2Fb"])
async def test_invalid_room_names_are_refused_with_a_reason(room: str) -> None:
    communicator = WebsocketCommunicator(app, f"/ws/chat/{room}/")
    connected, _ = await communicator.connect(timeout=10)
    assert connected  # accepted only to say why
    reply = await communicator.receive_json_from(timeout=10)
    assert reply["code"] == "invalid_room"
    assert (await communicator.receive_output(timeout=10)) == {
        "type": "websocket.close",
        "code": 4400,
    }


async def test_event_of_unknown_type_is_ignored_not_fatal() -> None:
    communicator = await joined("unknown")
    await get_channel_layer().group_send("chat.unknown", {"type": "order.created", "order_id": 1})
    await get_channel_layer().group_send(
        "chat.unknown",
        {
            "type": "chat.message",
            "id": "x",
            "message": "after",
            "user": "u",
            "room": "unknown",
            "sent_by": "elsewhere:1",
        },
    )
    frame = await communicator.receive_json_from(timeout=10)
    assert frame["message"] == "after" and frame["sent_by"] == "elsewhere:1"
    await communicator.disconnect()


async def test_disconnect_leaves_the_group(redis_url: str) -> None:
    communicator = await joined("leave")
    layer = get_channel_layer()
    assert await group_members_in_redis(layer, redis_url, "chat.leave") == 1
    await communicator.disconnect()
    assert await group_members_in_redis(layer, redis_url, "chat.leave") == 0


async def test_unknown_websocket_path_is_refused_with_a_reason() -> None:
    from config.routing import websocket_urlpatterns as all_routes

    communicator = WebsocketCommunicator(URLRouter(all_routes), "/ws/nothing-here/")
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    assert (await communicator.receive_json_from(timeout=10))["code"] == "not_found"
    assert (await communicator.receive_output(timeout=10))["code"] == 4404


class ImmediateWriter:
    """The worker's side of ``send`` as infra/uvicorn_ws.py offers it: ``send_text_now``
    writes a text frame at once when it can (here: into the communicator's output)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writable = True
        self.written: list[str] = []

    async def send(self, message: dict) -> None:
        await self.inner(message)

    def send_text_now(self, text: str) -> bool:
        if not self.writable:
            return False
        self.written.append(text)
        self.inner.__self__.put_nowait({"type": "websocket.send", "text": text})
        return True


async def test_an_idle_member_gets_room_messages_written_at_once_and_the_rest_as_usual(
    layer_on_redis: str,
) -> None:
    writers: list[ImmediateWriter] = []

    async def served(scope: dict, receive: Any, send: Any) -> None:
        writers.append(ImmediateWriter(send))
        await app(scope, receive, writers[-1].send)

    members = []
    for _ in range(3):
        communicator = WebsocketCommunicator(served, "/ws/chat/direct/")
        assert (await communicator.connect(timeout=10))[0]
        members.append(communicator)
    # The sender is busy in its own handler when the message comes back (it takes the usual
    # way, or not): only the other two are looked at.
    await members[0].send_json_to({"message": "one"})
    assert [(await m.receive_json_from(timeout=10))["message"] for m in members] == ["one"] * 3
    # Only the default layer offers messages to waiting consumers (channels-redis does not).
    direct = layer_on_redis == "fanout"
    assert [len(w.written) for w in writers[1:]] == ([1, 1] if direct else [0, 0])
    # A malformed event is not written at once: dispatched as usual, dropped, nobody closed.
    await get_channel_layer().group_send("chat.direct", {"type": "chat.message", "message": "x"})
    # A socket that cannot be written at once now gets its frame the usual way.
    writers[2].writable = False
    await members[0].send_json_to({"message": "two"})
    assert [(await m.receive_json_from(timeout=10))["message"] for m in members] == ["two"] * 3
    assert [len(w.written) for w in writers[1:]] == ([2, 1] if direct else [0, 0])
    for member in members:
        assert await member.receive_nothing(timeout=0.2)
        await member.disconnect()
