"""nginx's per-websocket buffers are sized for websocket traffic (loadtests/README.md, "What each
change bought"); these tests keep the sizes honest.

* ``proxy_buffer_size`` (nginx/snippets/websocket-proxy.conf) must hold the app's whole 101
  response head, or nginx answers 502 ("upstream sent too big header"): the head is measured
  straight from a replica and must fill at most half of it, so that a header added later still
  fits.
* A frame several times that size crosses nginx intact both ways (it is relayed in pieces).
* The biggest handshake the app issues for (a token for 50 rooms of 64 characters, with the
  browser session's cookies) still fits nginx's request header buffers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from pathlib import Path

import pytest

from tests.harness import RunningStack, recv_json, recv_until, room_path
from tests.security.conftest import create_users, log_in

pytestmark = pytest.mark.e2e

SNIPPET = Path(__file__).resolve().parents[2] / "nginx" / "snippets" / "websocket-proxy.conf"
#: The longest chat message the app accepts (CHAT_MAX_MESSAGE_CHARS' default).
LONGEST_MESSAGE = 4000
#: The most rooms a token may name (app/wsauth/views.py), each as long as a room name may be.
LONGEST_ROOMS = [f"r{i:02d}".ljust(64, "x") for i in range(50)]


def configured_size(directive: str, text: str) -> int:
    """Bytes of an nginx size directive (``1k``, ``2048``) in ``text``."""
    match = re.search(rf"^{directive}\s+(\d+)([kKmM]?);", text, re.MULTILINE)
    assert match, f"{directive} is not set"
    factor = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return int(match.group(1)) * factor


async def response_head(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


async def test_the_apps_101_fills_at_most_half_of_nginxs_relay_buffer(
    stack: RunningStack,
) -> None:
    buffer = configured_size("proxy_buffer_size", SNIPPET.read_text())
    host = f"localhost:{stack.stack.https_port}"
    # What nginx forwards (snippets/proxy-headers.conf), offering the subprotocol the app
    # selects: every header the app adds to its 101 is in this answer.
    request = (
        f"GET {room_path('buffers')} HTTP/1.1\r\n"
        f"Host: {host}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: switchboard.v1\r\n"
        f"Origin: {stack.origin}\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: https\r\n"
        f"X-Forwarded-Host: {host}\r\nX-Forwarded-Port: {stack.stack.https_port}\r\n"
        "X-Real-IP: 127.0.0.1\r\n\r\n"
    ).encode()
    head = await response_head(stack.stack.app_ports[0], request)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"switchboard.v1" in head, head
    assert len(head) * 2 <= buffer, (
        f"the app's 101 is {len(head)} bytes: raise proxy_buffer_size ({buffer}) in {SNIPPET}"
    )


async def test_the_longest_message_crosses_nginx_intact_both_ways(stack: RunningStack) -> None:
    message = "é" * LONGEST_MESSAGE  # 8,000 bytes of UTF-8: several relay buffers each way
    async with await stack.connect(room_path("buffers-long")) as ws:
        await ws.send(json.dumps({"message": message, "ref": "long"}, ensure_ascii=False))
        echo = await recv_json(ws)
    assert (echo["ref"], echo["message"]) == ("long", message)


async def test_the_biggest_token_handshake_opens_through_nginx(stack: RunningStack) -> None:
    create_users(stack, "buffers-token")
    session = log_in(stack, "buffers-token")
    session.get("/chat/lobby/")  # the csrftoken cookie
    response = session.post(
        "/api/ws-token/",
        data={"rooms": LONGEST_ROOMS},
        headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": f"{stack.base_url}/"},
    )
    session.close()
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    assert len(token) > 4500  # one header line bigger than any buffer but the large ones
    async with await stack.connect(
        room_path(LONGEST_ROOMS[-1]),
        cookies=session.cookies,
        subprotocols=["switchboard.v1", f"token.{token}"],
    ) as ws:
        assert ws.subprotocol == "switchboard.v1"
        await ws.send(json.dumps({"message": "all of it", "ref": "token"}))
        frame = await recv_until(ws, lambda f: f.get("ref") == "token")
    assert frame["user"] == "buffers-token"
