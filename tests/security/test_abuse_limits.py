"""Floods are limited per connection (the app) and per client IP (nginx); slow or garbage
handshakes are dropped by nginx's timeouts. Each limit is hit for real here.

Source addresses: every test floods from its own loopback address (127.0.0.5x), so nginx's
per-IP state of one test never leaks into another.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.faults.tools import ChatClient
from tests.harness import RunningStack, recv_json, room_path

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


# -- per connection (application) --------------------------------------------------------------
async def test_flooding_connection_is_rate_limited_then_closed(limits_stack: RunningStack) -> None:
    stack = limits_stack
    bystander = await ChatClient(stack, "flood", reconnect=False).start()
    offset = len(stack.log("app1"))
    ws = await stack.connect(room_path("flood"))
    try:
        for n in range(300):  # far past the burst (20) and the flood allowance (100 refusals)
            try:
                await ws.send(json.dumps({"message": f"flood {n}"}))
            except websockets.ConnectionClosed:
                break
        replies = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                replies.append(await recv_json(ws))
    finally:
        await ws.close()
    limited = [r for r in replies if r.get("code") == "rate_limited"]
    assert len(limited) >= 100
    assert {r["type"] for r in replies} <= {"chat.message", "error"}
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # The room's other member got the burst (plus what refilled meanwhile), in order, and is
    # still connected. (The flooder's own echoes still in flight were cut off by the close.)
    await asyncio.sleep(0.5)
    delivered = [m["message"] for m in bystander.messages]
    assert 20 <= len(delivered) <= 40
    assert delivered[:20] == [f"flood {n}" for n in range(20)]
    assert not bystander.closes
    await bystander.stop()
    # Logged with the reason: one line per run of refusals (not per frame), and the close.
    log = stack.log("app1")[offset:]
    assert 1 <= log.count("rate limited ") < 15 < len(limited)
    assert re.search(r"flood: closing \S+ room=flood after 10\d frames in a row", log)


async def test_a_client_within_the_rate_is_never_limited(limits_stack: RunningStack) -> None:
    async with await limits_stack.connect(room_path("polite")) as ws:
        for n in range(30):  # 8/s for almost 4 s: over the burst in total, under the rate
            await ws.send(json.dumps({"message": f"polite {n}"}))
            assert (await recv_json(ws))["type"] == "chat.message"
            await asyncio.sleep(1 / 8)


# -- per client IP (nginx) ---------------------------------------------------------------------
async def handshake(stack: RunningStack, address: str) -> int:
    """HTTP status of one websocket handshake from ``address`` (101 when it was accepted)."""
    try:
        ws = await stack.connect(room_path("limits"), local_addr=(address, 0))
    except websockets.InvalidStatus as refused:
        return refused.response.status_code
    await ws.close()
    return 101


async def test_handshake_rate_per_ip(limits_stack: RunningStack) -> None:
    """limit_req on /ws/: 20 handshakes/s per IP with a burst of 200, then 429."""
    stack = limits_stack
    flooder, other = "127.0.0.51", "127.0.0.52"
    offset = len(stack.log("nginx"))
    path = "/ws/chat/limits/?token=limit-req-canary"
    # A hundred keep-alive connections firing as fast as nginx answers: the 200 of the burst
    # wait for the app, everything after is refused at once -- and keeps the bucket empty.
    transport = httpx.AsyncHTTPTransport(
        verify=stack.ssl_context(), local_address=flooder, limits=httpx.Limits(max_connections=100)
    )
    statuses: list[int] = []
    emptied, stop = asyncio.Event(), asyncio.Event()
    async with httpx.AsyncClient(base_url=stack.base_url, transport=transport, timeout=60) as c:

        async def keep_hitting() -> None:
            while not stop.is_set() and len(statuses) < 20000:
                statuses.append((await c.get(path)).status_code)
                if statuses.count(429) >= 30:
                    emptied.set()

        flood = [asyncio.create_task(keep_hitting()) for _ in range(100)]
        await asyncio.wait_for(emptied.wait(), 60)
        # Meanwhile, ten websocket handshakes from the same address, sent within a few ms of
        # each other (TLS set up first): the bucket frees one slot per 50 ms.
        upgrades = await asyncio.gather(*(open_tls(stack, flooder) for _ in range(10)))
        handshakes = await asyncio.gather(*(upgrade(stack, *io) for io in upgrades))
        stop.set()
        await asyncio.gather(*flood)
    rejected = statuses.count(429)
    assert rejected >= 100, statuses
    assert len(statuses) - rejected >= 200  # the burst went through
    assert handshakes.count(429) >= 8, handshakes
    assert await handshake(stack, other) == 101  # per IP: nobody else is affected
    # The bucket refills at 20/s: a moment later the flooder may connect again.
    await asyncio.sleep(0.5)
    assert await handshake(stack, flooder) == 101
    log = stack.log("nginx")[offset:]
    rejected_line = r'127\.0\.0\.51 "GET /ws/chat/limits/ HTTP/1\.1" 429 .* limit_req=REJECTED'
    assert re.search(rejected_line, log)
    assert "limit-req-canary" not in log  # the query string never reaches a log


async def test_concurrent_connections_per_ip(limits_stack: RunningStack) -> None:
    """limit_conn on /ws/. Opening 2,001 sockets from one address at 20/s would take 100 s, so
    the mechanism is tested with the shipped directive's number lowered in this stack's copy."""
    stack = limits_stack
    shipped = (ROOT / "nginx" / "snippets" / "websocket-proxy.conf").read_text()
    assert re.search(r"^limit_conn ws_connections \d+;$", shipped, re.M)
    assert re.search(r"^limit_req zone=ws_handshakes burst=\d+ nodelay;$", shipped, re.M)
    site = (ROOT / "nginx" / "templates" / "switchboard.conf.template").read_text()
    assert re.search(r"location /ws/ \{\s*include snippets/websocket-proxy\.conf;", site)

    copy = stack.stack.run_dir / "nginx" / "snippets" / "websocket-proxy.conf"
    lowered = re.sub(r"limit_conn ws_connections \d+;", "limit_conn ws_connections 5;", shipped)
    copy.write_text(lowered)
    reload_nginx(stack)
    holder, other = "127.0.0.53", "127.0.0.54"
    held = []
    try:
        for _ in range(5):
            held.append(await stack.connect(room_path("limits"), local_addr=(holder, 0)))
        assert await handshake(stack, holder) == 429
        assert await handshake(stack, other) == 101
        await held.pop().close()
        await asyncio.sleep(0.2)
        assert await handshake(stack, holder) == 101
    finally:
        await asyncio.gather(*(ws.close() for ws in held))
        copy.write_text(shipped)
        reload_nginx(stack)
    assert re.search(
        r'127\.0\.0\.53 "GET /ws/chat/limits/ HTTP/1\.1" 429 .* limit_conn=REJECTED',
        stack.log("nginx"),
    )


async def open_tls(
    stack: RunningStack, address: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1",
        stack.stack.https_port,
        ssl=stack.ssl_context(),
        server_hostname="localhost",
        local_addr=(address, 0),
    )


async def upgrade(
    stack: RunningStack, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> int:
    """Send a websocket handshake on an open TLS connection; the HTTP status it got."""
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {room_path('limits')} HTTP/1.1\r\nHost: localhost:{stack.stack.https_port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: {stack.origin}\r\n\r\n".encode()
    )
    await writer.drain()
    status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    writer.close()
    return status


def reload_nginx(stack: RunningStack) -> None:
    """HUP nginx and wait until its new workers run (the old ones log "exiting")."""
    before = stack.log("nginx").count("start worker process")
    assert stack.stack.supervisorctl("signal", "HUP", "nginx").returncode == 0
    deadline = time.monotonic() + 10
    while stack.log("nginx").count("start worker process") <= before:
        assert time.monotonic() < deadline, "nginx did not reload"
        time.sleep(0.05)
    time.sleep(0.3)


# -- slow and garbage handshakes ---------------------------------------------------------------
def closed_after(
    stack: RunningStack,
    send: list[bytes],
    *,
    tls: bool = True,
    every: float = 0.0,
    limit: float = 30,
) -> tuple[float, bytes]:
    """Connect, send the chunks (``every`` seconds apart), then read until nginx closes."""
    raw = socket.create_connection(("127.0.0.1", stack.stack.https_port), timeout=limit)
    started = time.monotonic()
    conn: socket.socket = raw
    try:
        if tls:
            context = stack.ssl_context()
            conn = context.wrap_socket(raw, server_hostname="localhost")
        received = b""
        for chunk in send:
            try:
                conn.sendall(chunk)
            except OSError:
                break
            time.sleep(every)
        while time.monotonic() - started < limit:
            try:
                data = conn.recv(4096)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not data:
                break
            received += data
        return time.monotonic() - started, received
    finally:
        conn.close()


async def test_slow_and_garbage_handshakes_are_dropped(limits_stack: RunningStack) -> None:
    stack = limits_stack
    request = (
        b"GET /ws/chat/slow/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    )
    cases = {
        # TCP connected, no TLS handshake at all.
        "silent": asyncio.to_thread(closed_after, stack, [], tls=False),
        # TLS done, half a request line, then nothing.
        "stalled": asyncio.to_thread(closed_after, stack, [request[:40]]),
        # Slowloris: a header byte every 2 s, never finishing the header.
        "trickle": asyncio.to_thread(closed_after, stack, [bytes([b]) for b in request], every=2),
        # Garbage after TLS, and plain text where TLS is expected.
        "garbage": asyncio.to_thread(closed_after, stack, [b"\x00\xff\x13\x37" * 64 + b"\r\n\r\n"]),
        "plaintext": asyncio.to_thread(closed_after, stack, [request + b"\r\n"], tls=False),
    }
    results = dict(zip(cases, await asyncio.gather(*cases.values()), strict=True))
    for name in ("silent", "stalled", "trickle"):
        seconds, _ = results[name]
        assert 8 <= seconds <= 16, (name, seconds)  # client_header_timeout (10 s)
    for name in ("garbage", "plaintext"):
        seconds, answer = results[name]
        assert seconds < 3, (name, seconds)
        assert answer.startswith(b"HTTP/1.1 400"), (name, answer[:80])
