"""Notification sockets belong to the session that opened them.

One user's session cookie cannot reach another user's notifications (the group comes from the
authenticated user, never from the request); forged or tampered cookies are anonymous; a foreign
Origin is refused even with a valid cookie (cross-site websocket hijacking); logging out closes
the sockets of that session -- and only that session's.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import websockets

from tests.harness import TEST_PASSWORD, RunningStack, recv_json, recv_until

pytestmark = pytest.mark.e2e


def user_pk(stack: RunningStack, username: str) -> int:
    script = (f"from django.contrib.auth import get_user_model; "
              f"print(get_user_model().objects.get(username={username!r}).pk)")
    return int(stack.manage("shell", "-c", script).stdout.strip().splitlines()[-1])


def second_session(stack: RunningStack, username: str) -> httpx.Client:
    """Log an existing user in once more, as another device would.

    (RunningStack.login re-saves the password, which would end every earlier session.)
    """
    client = stack.http()
    page = client.get("/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = client.post(
        "/accounts/login/",
        data={"username": username, "password": TEST_PASSWORD, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{stack.base_url}/accounts/login/"},
    )
    assert response.status_code == 302, response.text[:300]
    return client


async def refused_with(ws: websockets.ClientConnection) -> tuple[str, int]:
    frame = await recv_json(ws)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await ws.recv()
    return frame["code"], closed.value.rcvd.code


async def notify(stack: RunningStack, username: str, message: str) -> None:
    result = await asyncio.to_thread(stack.manage, "notify", username, message)
    assert result.stdout.startswith("sent ")


async def test_a_cookie_reaches_only_its_own_users_notifications(stack: RunningStack) -> None:
    mallory = stack.login("mallory")
    victim = stack.login("victim")
    victim_pk = user_pk(stack, "victim")
    # Whatever Mallory puts in the URL, the group is the one of the user her cookie names.
    paths = ["/ws/notifications/", f"/ws/notifications/?user={victim_pk}",
             f"/ws/notifications/?user_id={victim_pk}&group=notifications.user.{victim_pk}"]
    sockets = [await stack.connect(p, cookies=mallory.cookies) for p in paths]
    victims = await stack.connect("/ws/notifications/", cookies=victim.cookies)
    try:
        await notify(stack, "victim", "for the victim only")
        frame = await recv_json(victims)
        assert frame["message"] == "for the victim only"
        for ws in sockets:
            with pytest.raises(TimeoutError):
                await recv_json(ws, timeout=1)
        await notify(stack, "mallory", "for mallory")
        for ws in sockets:
            assert (await recv_json(ws))["message"] == "for mallory"
        with pytest.raises(TimeoutError):
            await recv_json(victims, timeout=1)
    finally:
        await asyncio.gather(*(ws.close() for ws in [*sockets, victims]))
        mallory.close()
        victim.close()


@pytest.mark.parametrize("cookie", ["forged", "tampered", "none"])
async def test_forged_or_tampered_session_cookies_are_anonymous(
    stack: RunningStack, cookie: str
) -> None:
    real = stack.login("cookie-owner")
    value = real.cookies["sessionid"]
    real.close()
    jar = httpx.Cookies()
    if cookie == "forged":
        jar.set("sessionid", "x" * 32)
    elif cookie == "tampered":
        jar.set("sessionid", value[:-1] + ("a" if value[-1] != "a" else "b"))
    ws = await stack.connect("/ws/notifications/", cookies=jar)
    assert await refused_with(ws) == ("auth_required", 4401)


async def test_a_valid_cookie_from_a_foreign_origin_is_refused(stack: RunningStack) -> None:
    client = stack.login("hijacked")
    for origin in ("https://evil.example", "null", f"https://localhost.evil.example:{9}"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await stack.connect("/ws/notifications/", cookies=client.cookies, origin=origin)
        assert refused.value.response.status_code == 403
    client.close()


async def test_logout_closes_that_sessions_sockets_and_only_those(stack: RunningStack) -> None:
    laptop = stack.login("two-devices")
    phone = second_session(stack, "two-devices")
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
        await notify(stack, "two-devices", "still here")
        frame = await recv_until(phone_socket, lambda f: f.get("type") == "notification")
        assert frame["message"] == "still here"
        # The logged-out session cookie no longer authenticates a socket.
        ws = await stack.connect("/ws/notifications/", cookies=old_cookies)
        assert await refused_with(ws) == ("auth_required", 4401)
    finally:
        await asyncio.gather(*(ws.close() for ws in [*laptop_sockets, phone_socket]))
        laptop.close()
        phone.close()
