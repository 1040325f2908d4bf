"""Notification sockets belong to the session that opened them.

One user's session cookie cannot reach another user's notifications (the group comes from the
authenticated user, never from the request); forged or tampered cookies are anonymous; a foreign
Origin is refused even with a valid cookie (cross-site websocket hijacking); logging out closes
the sockets of that session -- and only that session's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.harness import RunningStack, recv_json, recv_until
from tests.security.conftest import create_users, log_in, notify_self

pytestmark = pytest.mark.e2e

USERS = ("mallory", "victim", "cookie-owner", "hijacked", "two-devices")


@pytest.fixture(scope="module")
def users(stack: RunningStack) -> Iterator[dict[str, int]]:
    yield create_users(stack, *USERS)


async def refused_with(ws: websockets.ClientConnection) -> tuple[str, int]:
    frame = await recv_json(ws)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    return frame["code"], closed.value.rcvd.code


async def test_a_cookie_reaches_only_its_own_users_notifications(
    stack: RunningStack, users: dict[str, int]
) -> None:
    mallory, victim = log_in(stack, "mallory"), log_in(stack, "victim")
    pk = users["victim"]
    # Whatever Mallory puts in the URL, the group is the one of the user her cookie names.
    paths = [
        "/ws/notifications/",
        f"/ws/notifications/?user={pk}",
        f"/ws/notifications/?user_id={pk}&group=notifications.user.{pk}",
    ]
    sockets = [await stack.connect(p, cookies=mallory.cookies) for p in paths]
    victims = await stack.connect("/ws/notifications/", cookies=victim.cookies)
    try:
        notify_self(stack, victim, "for the victim only")
        assert (await recv_json(victims))["message"] == "for the victim only"
        notify_self(stack, mallory, "for mallory")
        for ws in sockets:  # the first thing each of Mallory's sockets gets is her own
            assert (await recv_json(ws))["message"] == "for mallory"
        with pytest.raises(TimeoutError):
            await recv_json(victims, timeout=0.5)
    finally:
        await asyncio.gather(*(ws.close() for ws in [*sockets, victims]))
        mallory.close()
        victim.close()


@pytest.mark.parametrize("cookie", ["forged", "tampered", "none"])
async def test_forged_or_tampered_session_cookies_are_anonymous(
    stack: RunningStack, users: dict[str, int], cookie: str
) -> None:
    jar = httpx.Cookies()
    if cookie == "forged":
        jar.set("sessionid", "x" * 32)
    elif cookie == "tampered":
        real = log_in(stack, "cookie-owner")
        value = real.cookies["sessionid"]
        real.close()
        jar.set("sessionid", value[:-1] + ("a" if value[-1] != "a" else "b"))
    ws = await stack.connect("/ws/notifications/", cookies=jar)
    assert await refused_with(ws) == ("auth_required", 4401)


async def test_a_valid_cookie_from_a_foreign_origin_is_refused(
    stack: RunningStack, users: dict[str, int]
) -> None:
    client = log_in(stack, "hijacked")
    for origin in ("https://evil.example", "null", "https://localhost.evil.example"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await stack.connect("/ws/notifications/", cookies=client.cookies, origin=origin)
        assert refused.value.response.status_code == 403
    client.close()


async def test_logout_closes_that_sessions_sockets_and_only_those(
    stack: RunningStack, users: dict[str, int]
) -> None:
    laptop, phone = log_in(stack, "two-devices"), log_in(stack, "two-devices")
    assert laptop.cookies["sessionid"] != phone.cookies["sessionid"]
    laptop_sockets = [
        await stack.connect("/ws/notifications/", cookies=laptop.cookies) for _ in range(2)
    ]
    phone_socket = await stack.connect("/ws/notifications/", cookies=phone.cookies)
    old_cookies = httpx.Cookies(laptop.cookies)
    try:
        response = stack.csrf_post(laptop, "/accounts/logout/", {})
        assert response.status_code == 302
        for ws in laptop_sockets:
            assert await refused_with(ws) == ("logged_out", 4401)
        # The phone's session is untouched: still open, still delivered to.
        notify_self(stack, phone, "still here")
        frame = await recv_until(phone_socket, lambda f: f.get("type") == "notification")
        assert frame["message"] == "still here"
        # The logged-out session cookie no longer authenticates a socket.
        ws = await stack.connect("/ws/notifications/", cookies=old_cookies)
        assert await refused_with(ws) == ("auth_required", 4401)
    finally:
        await asyncio.gather(*(ws.close() for ws in [*laptop_sockets, phone_socket]))
        laptop.close()
        phone.close()
