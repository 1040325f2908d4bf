"""NotificationConsumer and notify_user through WebsocketCommunicator, against real Redis."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from notifications.publish import notify_user, user_group
from notifications.routing import websocket_urlpatterns

pytestmark = pytest.mark.usefixtures("layer_on_redis")

app = URLRouter(websocket_urlpatterns)


class FakeUser:
    """Only what the consumer reads from scope["user"]."""

    is_authenticated = True

    def __init__(self, pk: int) -> None:
        self.pk = pk


class FakeSession:
    def __init__(self, key: str) -> None:
        self.session_key = key


async def subscribed(user_id: int, session_key: str = "s1") -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(app, "/ws/notifications/")
    communicator.scope["user"] = FakeUser(user_id)
    communicator.scope["session"] = FakeSession(session_key)
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return communicator


async def test_anonymous_users_are_refused_with_a_reason() -> None:
    communicator = WebsocketCommunicator(app, "/ws/notifications/")
    communicator.scope["user"] = AnonymousUser()
    connected, _ = await communicator.connect(timeout=10)
    assert connected  # accepted only to say why
    assert (await communicator.receive_json_from(timeout=10))["code"] == "auth_required"
    assert (await communicator.receive_output(timeout=10))["code"] == 4401


async def test_notify_user_from_sync_code_reaches_only_that_user() -> None:
    alice, bob = await subscribed(101), await subscribed(102)
    event_id = await sync_to_async(notify_user)(101, "hello alice", data={"k": 1})
    frame = await alice.receive_json_from(timeout=10)
    assert frame["type"] == "notification"
    assert frame["id"] == event_id
    assert frame["message"] == "hello alice"
    assert frame["notification_type"] == "info"
    assert frame["data"] == {"k": 1}
    assert frame["sent_by"] and frame["delivered_by"]
    assert await bob.receive_nothing(timeout=0.5)
    await alice.disconnect()
    await bob.disconnect()


async def test_seed_style_signal_event_is_delivered() -> None:
    """The seeds' post_save handler sends {"type": "notification", "notification_type", ...}."""
    communicator = await subscribed(103)
    await get_channel_layer().group_send(
        user_group(103),
        {
            "type": "notification",
            "notification_type": "new_comment",
            "message": "New comment on your post",
            "data": {"comment_id": 9},
        },
    )
    frame = await communicator.receive_json_from(timeout=10)
    assert frame["notification_type"] == "new_comment" and frame["data"] == {"comment_id": 9}
    await communicator.disconnect()


async def test_clients_cannot_send_on_the_notification_socket() -> None:
    communicator = await subscribed(105)
    await communicator.send_to(text_data='{"message": "hi"}')
    assert (await communicator.receive_json_from(timeout=10))["code"] == "read_only"
    await communicator.disconnect()


def test_user_groups_cannot_collide_with_room_groups() -> None:
    from chat.protocol import is_valid_room, room_group

    # A room group is "chat.<room>" and room names have no dots: no room name can produce
    # "notifications.user.<pk>", nor another room's group.
    assert user_group(7) == "notifications.user.7"
    assert not is_valid_room("x.user.7")
    # The one room that could map onto a user's group is that group without the room prefix:
    # it must not be a valid room name (it has dots), whatever either function becomes.
    room_prefix = room_group("")
    for pk in (1, 7, 123456):
        group = user_group(pk)
        assert not group.startswith(room_prefix) or not is_valid_room(group[len(room_prefix) :])
    with pytest.raises(ValueError):
        user_group("7; other")  # type: ignore[arg-type]
