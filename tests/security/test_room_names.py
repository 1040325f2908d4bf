"""Room and group names: a crafted room name can never reach another user's group.

A room's group is ``chat.<room>`` with the room limited to 1-64 of ``[A-Za-z0-9_-]``; a user's
group is ``notifications.user.<pk>``. The property test shows the two families never meet (and
that distinct rooms never share a group); the end-to-end tests throw crafted names at the
endpoint and look for any crossing.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse

import pytest
import websockets
from channels.layers import BaseChannelLayer
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.protocol import is_valid_room, room_group
from notifications.publish import user_group
from tests.harness import RunningStack, recv_json
from tests.security.conftest import create_users, log_in, notify_self

pytestmark = pytest.mark.e2e

LAYER = BaseChannelLayer()
room_like = st.text(st.characters(), max_size=80) | st.from_regex(r"[A-Za-z0-9_.\-:/ ]{0,80}")


@settings(max_examples=500, deadline=None)
@given(a=room_like, b=room_like, pk=st.integers(min_value=0, max_value=2**63))
def test_room_groups_never_collide_with_user_groups_or_each_other(a: str, b: str, pk: int) -> None:
    for room in (a, b):
        if not is_valid_room(room):
            continue
        group = room_group(room)
        assert group != user_group(pk)
        assert not group.startswith("notifications.")
        # A name the channel layer accepts (ASCII, < 100 characters, [a-zA-Z0-9_.-]).
        assert LAYER.require_valid_group_name(group)
        assert re.fullmatch(r"[a-zA-Z\d\-_.]+", group) and len(group) < 100
    if is_valid_room(a) and is_valid_room(b) and a != b:
        assert room_group(a) != room_group(b)


CRAFTED = [
    "notifications.user.1",
    "..",
    ".",
    "a/b",
    "a%2Fb",
    "a b",
    "ünï",
    "a" * 65,
    "",
    "\uff4c\uff4f\uff42\uff42\uff59",  # "lobby" in full-width letters
    "lobby\n",
    "lobby\r\nX-Injected: 1",
    "lobby%00",
    "chat.lobby",
    "*",
    "asgi:group:chat.x",
    "lobby/../notifications",
    "%2e%2e",
    "lobby;x",
    "lobby?x=1",
    "\u202elobby",
    "1\u0661",
]


def crafted_path(room: str) -> str:
    return "/ws/chat/" + urllib.parse.quote(room, safe="") + "/"


@pytest.mark.parametrize("room", CRAFTED)
async def test_crafted_room_names_are_refused_with_a_reason(stack: RunningStack, room: str) -> None:
    try:
        ws = await stack.connect(crafted_path(room))
    except websockets.InvalidStatus as refused:  # nginx or the router said no at the handshake
        assert refused.value.response.status_code in {400, 403, 404}
        return
    frame = await recv_json(ws)
    assert frame["code"] in {"invalid_room", "not_found"}, frame
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd.code in {4400, 4404}
    # A refusal is logged on one line whatever the name carried (no forged log lines).
    logs = "".join(stack.log(f"app{i}") for i in range(1, stack.stack.replicas + 1))
    assert "X-Injected: 1\n" not in logs and "\nX-Injected" not in logs


async def test_rooms_named_like_groups_hear_no_notifications(stack: RunningStack) -> None:
    pk = create_users(stack, "group-owner")["group-owner"]
    user = log_in(stack, "group-owner")
    lookalikes = [f"notifications-user-{pk}", f"notifications_user_{pk}", f"user-{pk}", str(pk)]
    rooms = [await stack.connect(crafted_path(name)) for name in lookalikes]
    mine = await stack.connect("/ws/notifications/", cookies=user.cookies)
    try:
        notify_self(stack, user, "private")
        assert (await recv_json(mine))["message"] == "private"
        await asyncio.gather(*(ws.send('{"message": "after"}') for ws in rooms))
        for ws in rooms:  # each room's first frame is its own echo, not the notification
            assert (await recv_json(ws))["type"] == "chat.message"
    finally:
        await asyncio.gather(*(ws.close() for ws in [*rooms, mine]))
        user.close()
