"""infra/uvicorn_ws.py against the uvicorn and websockets it was checked with.

``LeanWebSocketsProtocol`` replaces two attributes of uvicorn's sans-I/O protocol with lighter
objects, clears two more after the handshake, and takes over its closing handshake after an
oversize frame, all of which depends on uvicorn's internals. These tests say which internal
changed, so that an upgrade fails here, clearly, instead of in production. Then re-check
infra/uvicorn_ws.py against the new code and move the pin in pyproject.toml.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import inspect
import os
import socket
import textwrap
import tomllib
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from packaging.requirements import Requirement
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

from infra import uvicorn_ws
from infra.uvicorn_ws import (
    SERVER_WIDE,
    KeepaliveWheel,
    LeanEvent,
    LeanQueue,
    LeanWebSocketsProtocol,
    PingDue,
    RefusedFrameDrain,
    ServerProtocolKeepingUnparsedBytes,
    shared_headers,
    text_frame,
)

ROOT = Path(__file__).resolve().parents[2]
MAX_SIZE = 64 * 1024

UPGRADE_HINT = (
    "infra/uvicorn_ws.py relies on this uvicorn internal; re-check the module against "
    "uvicorn {} (websockets_sansio_impl.py), then move the pin in pyproject.toml"
)


def _methods_using(attribute: str) -> dict[str, set[str]]:
    """uvicorn protocol method -> what it does with ``self.<attribute>`` (``.name`` for a
    method called or attribute read on it, ``=`` for an assignment, ``read`` otherwise)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(WebSocketsSansIOProtocol)))
    uses: dict[str, set[str]] = {}
    for method in tree.body[0].body:
        if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        parents = {child: node for node in ast.walk(method) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(method):
            if not (
                isinstance(node, ast.Attribute)
                and node.attr == attribute
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute):
                use = "." + parent.attr
            elif isinstance(node.ctx, ast.Store):
                use = "="
            else:
                use = "read"
            uses.setdefault(method.name, set()).add(use)
    return uses


def test_the_installed_versions_are_the_pinned_ones() -> None:
    """pyproject.toml pins the releases infra/uvicorn_ws.py was checked against."""
    pins = {
        Requirement(line).name: Requirement(line).specifier
        for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    for name in ("uvicorn", "websockets"):
        assert version(name) in pins[name], (
            f"{name} {version(name)} is installed, outside the {pins[name]} that "
            "infra/uvicorn_ws.py was checked against; run `make venv`, or re-check the module "
            "and move the pin"
        )


@pytest.mark.parametrize(
    ("attribute", "replacement"), [("queue", LeanQueue), ("writable", LeanEvent)]
)
def test_uvicorn_uses_only_what_the_lean_replacements_implement(
    attribute: str, replacement: type
) -> None:
    implemented = {"." + name for name in dir(replacement) if not name.startswith("__")}
    used = set().union(*_methods_using(attribute).values()) - {"=", "read"}
    missing = used - implemented
    assert not missing, (
        f"uvicorn's protocol now uses self.{attribute}{sorted(missing)}, which "
        f"{replacement.__name__} does not implement. " + UPGRADE_HINT.format(uvicorn.__version__)
    )


def test_the_handshake_objects_are_read_only_during_the_handshake() -> None:
    """LeanWebSocketsProtocol sets request and response to None once the handshake is over."""
    for attribute in ("request", "response"):
        readers = set(_methods_using(attribute))
        assert readers <= {"handle_connect", "send"}, (
            f"uvicorn now reads self.{attribute} in {sorted(readers)}. "
            + UPGRADE_HINT.format(uvicorn.__version__)
        )


def test_the_hooks_the_closing_handshake_relies_on_are_there() -> None:
    source = inspect.getsource(WebSocketsSansIOProtocol)
    hooks = {
        "data_received hands a parser failure to handle_parser_exception": (
            "def data_received" in source and "self.handle_parser_exception()" in source
        ),
        "run_asgi leaves the transport open while close_timer is set": (
            "if self.close_timer is None:\n            self.transport.close()" in source
        ),
        "connection_lost cancels close_timer": "self.close_timer.cancel()" in source,
        "the protocol builds a websockets ServerProtocol as self.conn": (
            "self.conn = ServerProtocol(" in source
        ),
    }
    broken = [hook for hook, holds in hooks.items() if not holds]
    assert not broken, f"{broken}. " + UPGRADE_HINT.format(uvicorn.__version__)
    for name in ("close_timeout", "close_sent", "read_paused", "close_timer"):
        assert "=" in _methods_using(name).get("__init__", set()), (
            f"uvicorn's protocol no longer sets self.{name} in __init__. "
            + UPGRADE_HINT.format(uvicorn.__version__)
        )


# -- the closing handshake after an oversize frame, on a real socket ----------------------------
#: The protocol instances the test server made (to look inside them).
PROTOCOLS: list[LeanWebSocketsProtocol] = []


async def _app(scope: dict, receive: Any, send: Any) -> None:
    """Accepts, echoes text frames, and checks websockets kept no handshake request."""
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    parser = PROTOCOLS[-1].conn.parser
    assert parser.gi_code is Protocol.parse.__code__, "the handshake parser is still in use"
    while (message := await receive())["type"] != "websocket.disconnect":
        if message["text"] == "now":  # the consumers' shortcut (send_text_now), then its result
            wrote = PROTOCOLS[-1].send_text_now("now")
            await send({"type": "websocket.send", "text": str(wrote)})
            continue
        if message["text"] == "paused":  # the same while the transport asks to stop writing
            PROTOCOLS[-1].pause_writing()
            wrote = PROTOCOLS[-1].send_text_now("not now")
            PROTOCOLS[-1].resume_writing()
            await send({"type": "websocket.send", "text": str(wrote)})
            continue
        await send({"type": "websocket.send", "text": message["text"]})


@pytest.fixture
async def lean_server() -> AsyncIterator[int]:
    """A real listening socket on loopback served by LeanWebSocketsProtocol; its port."""
    config = Config(app=_app, ws=LeanWebSocketsProtocol, ws_max_size=MAX_SIZE, lifespan="off")
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: PROTOCOLS.append(LeanWebSocketsProtocol(config, state, {})) or PROTOCOLS[-1],
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for connection in list(state.connections):
            connection.transport.close()
        for task in list(state.tasks):
            task.cancel()


def _handshake(sock: socket.socket, port: int) -> bytes:
    """The opening handshake on ``sock``; what was read (the 101 response, maybe more)."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 101"), reply
    return reply


def _client_refused_frame(port: int, size: int) -> tuple[int, bytes]:
    """Handshake, send a ``size``-byte text frame in two parts (the close comes after the
    first), answer the close, read to the end. The close code received and what ended it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reply = _handshake(sock, port)
        frame = Frame(Opcode.TEXT, b"x" * size).serialize(mask=True)
        sock.sendall(frame[:16384])
        data = reply.split(b"\r\n\r\n", 1)[1]
        while len(data) < 4 or len(data) < 2 + data[1]:
            data += sock.recv(4096)
        assert data[0] == 0x88, data[:8]  # a close frame, unmasked, short
        code = int.from_bytes(data[2:4], "big")
        # The server is still reading: the rest of the frame, then our close frame, go through.
        sock.sendall(frame[16384:])
        sock.sendall(Frame(Opcode.CLOSE, Close(code, "").serialize()).serialize(mask=True))
        tail = sock.recv(4096)  # b"": the server closed cleanly (a reset would raise)
    return code, tail


@pytest.mark.parametrize("size", [200 * 1024, 2 * 1024 * 1024])
async def test_an_oversize_frame_is_read_to_its_end_and_closed_with_1009(
    lean_server: int, size: int
) -> None:
    code, tail = await asyncio.to_thread(_client_refused_frame, lean_server, size)
    assert code == CloseCode.MESSAGE_TOO_BIG
    assert tail == b""


def test_the_drain_skips_payloads_and_stops_at_the_close_frame() -> None:
    rest_of_refused = b"r" * 1000
    ping = Frame(Opcode.PING, b"p").serialize(mask=True)
    big = Frame(Opcode.BINARY, b"b" * 70000).serialize(mask=True)
    close = Frame(Opcode.CLOSE, Close(1009, "").serialize()).serialize(mask=True)
    stream = rest_of_refused + ping + big + close
    for chunk in (1, 7, 4096, len(stream)):
        drain = RefusedFrameDrain(len(rest_of_refused))
        results = [drain.feed(stream[i : i + chunk]) for i in range(0, len(stream), chunk)]
        assert results[-1] is True and not any(results[:-1]), chunk
        assert len(drain.pending) <= len(close), "payloads were stored"


def test_the_handshake_parser_is_the_frame_parser_behind_a_request() -> None:
    """release_handshake_parser swaps websockets' server parser for the frame parser it
    delegates to once the request is read."""
    source = inspect.getsource(ServerProtocol.parse)
    assert "request = yield from Request.parse(" in source, UPGRADE_HINT.format(version("uvicorn"))
    assert source.rstrip().endswith("yield from super().parse()"), (
        "websockets' ServerProtocol.parse no longer ends by delegating to Protocol.parse; "
        "re-check LeanWebSocketsProtocol.release_handshake_parser"
    )


async def test_after_the_handshake_frames_flow_and_the_request_is_not_kept(
    lean_server: int,
) -> None:
    def echo() -> bytes:
        with socket.create_connection(("127.0.0.1", lean_server), timeout=10) as sock:
            _handshake(sock, lean_server)
            sock.sendall(Frame(Opcode.TEXT, b"hello").serialize(mask=True))
            data = b""
            while len(data) < 7:
                data += sock.recv(4096)
            return data

    assert await asyncio.to_thread(echo) == b"\x81\x05hello"


async def test_a_frame_is_written_at_once_only_while_the_socket_is_open(lean_server: int) -> None:
    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", lean_server), timeout=10) as sock:
            _handshake(sock, lean_server)
            sock.sendall(Frame(Opcode.TEXT, b"now").serialize(mask=True))
            sock.sendall(Frame(Opcode.TEXT, b"paused").serialize(mask=True))
            data = b""
            while len(data) < 18:
                data += sock.recv(4096)
            return data

    # Written at once while open; while writing is paused nothing is written (send() waits).
    assert await asyncio.to_thread(exchange) == b"\x81\x03now\x81\x04True\x81\x05False"
    protocol = PROTOCOLS[-1]
    for _ in range(100):  # the client closed its socket: uvicorn sees it within a loop turn
        if protocol.disconnected:
            break
        await asyncio.sleep(0.01)
    assert protocol.disconnected
    assert protocol.send_text_now("late") is False  # nothing written: send() decides


@pytest.mark.parametrize("text", ["", "hello", "é" * 63, "x" * 126, "☃" * 30000, "x" * 70000])
def test_a_text_frame_is_the_bytes_websockets_would_send(text: str) -> None:
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    protocol.send_text(text.encode())
    assert text_frame(text) == b"".join(protocol.data_to_send())
    assert text_frame(text) is text_frame(text)  # built once for the same object


def test_uvicorn_sends_text_frames_the_way_the_shortcut_does() -> None:
    source = inspect.getsource(WebSocketsSansIOProtocol.send)
    assert "self.conn.send_text(text_data.encode())" in source, (
        "uvicorn changed how it sends a text frame; re-check LeanWebSocketsProtocol.send. "
        + UPGRADE_HINT.format(uvicorn.__version__)
    )


def test_the_drain_does_not_store_a_close_frame_that_claims_to_be_huge() -> None:
    drain = RefusedFrameDrain(0)
    header = b"\x88\xff" + (2**40).to_bytes(8, "big") + b"mask"  # close, 1 TiB, masked
    assert drain.feed(header) is True


def test_the_protocol_keeps_the_unparsed_bytes_of_a_failure() -> None:
    protocol = ServerProtocolKeepingUnparsedBytes(max_size=MAX_SIZE)
    assert isinstance(protocol.reader.buffer, bytearray), UPGRADE_HINT.format(uvicorn.__version__)


def test_the_server_wide_attributes_are_set_once_per_server() -> None:
    """LeanWebSocketsProtocol keeps SERVER_WIDE attributes once per server, not per socket."""
    for attribute in SERVER_WIDE:
        setters = {name for name, uses in _methods_using(attribute).items() if "=" in uses}
        assert setters <= {"__init__"}, (
            f"uvicorn now sets self.{attribute} in {sorted(setters - {'__init__'})}: it may "
            "differ per connection. " + UPGRADE_HINT.format(uvicorn.__version__)
        )


async def test_connections_share_the_server_wide_values_and_no_more() -> None:
    config = Config(app=_app, ws=LeanWebSocketsProtocol, lifespan="off")
    config.load()
    state, app_state = ServerState(), {}
    first, second = (LeanWebSocketsProtocol(config, state, app_state) for _ in range(2))
    assert first.config is second.config is config
    assert first.connections is second.connections is state.connections
    own = set(vars(first))
    assert not own & set(SERVER_WIDE)
    # CPython shares one key table among a class's instances of up to 30 attributes; the
    # handshake adds request, response and scope.
    assert len(own) + 3 <= 30, sorted(own)
    other = Config(app=_app, ws=LeanWebSocketsProtocol, lifespan="off", ws_ping_interval=1.5)
    other.load()
    with pytest.raises(RuntimeError, match="SERVER_WIDE"):
        LeanWebSocketsProtocol(other, state, app_state)  # another value, same server


def test_headers_are_shared_between_sockets_where_nobody_can_tell() -> None:
    def request(key: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"host", b"chat.example"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-key", key),
            (b"cookie", b"sessionid=" + key),
        ]

    first, second = request(b"a" * 24), request(b"b" * 24)
    shared_first, shared_second = shared_headers(first), shared_headers(second)
    assert shared_first == first and shared_second == second  # the same headers
    assert shared_first[0] is shared_second[0] and shared_first[1] is shared_second[1]
    assert shared_first[2][0] is shared_second[2][0]  # a name: one object
    assert shared_first[3][1] is not shared_second[3][1]
    # Values of other headers (keys, cookies, tokens) are never kept beyond their socket.
    assert all(b"sessionid" not in repr(entry).encode() for entry in uvicorn_ws._shared_headers)


def test_the_shared_headers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uvicorn_ws, "_shared_headers", {})
    for n in range(uvicorn_ws.SHARED_HEADERS_MAX + 100):
        headers = [(b"x-%d" % n, b"1"), (b"user-agent", b"agent %d" % n)]
        assert shared_headers(headers) == headers
    assert len(uvicorn_ws._shared_headers) <= uvicorn_ws.SHARED_HEADERS_MAX + 2


def test_uvicorn_only_cancels_the_ping_timer_and_schedules_pings_in_one_place() -> None:
    """LeanWebSocketsProtocol.schedule_ping hands uvicorn a PingDue (cancel() only) instead
    of an event-loop timer, and computes the delay as uvicorn's own schedule_ping does."""
    used = set().union(*_methods_using("ping_timer").values())
    assert used <= {"=", "read", ".cancel"}, (
        f"uvicorn now uses self.ping_timer{sorted(used)}. "
        + UPGRADE_HINT.format(uvicorn.__version__)
    )
    source = inspect.getsource(WebSocketsSansIOProtocol.schedule_ping)
    for expected in (
        "max(0.0, self.ping_interval - self.last_ping_rtt)",
        "call_later(delay, self.send_keepalive_ping)",
    ):
        assert expected in source, (
            f"uvicorn's schedule_ping changed ({expected!r} is gone). "
            + UPGRADE_HINT.format(uvicorn.__version__)
        )


class PingCounter:
    def __init__(self, fail: bool = False) -> None:
        self.pings = 0
        self.fail = fail
        self.pinged = asyncio.Event()

    def send_keepalive_ping(self) -> None:
        self.pings += 1
        self.pinged.set()
        if self.fail:
            raise RuntimeError("transport gone")


async def test_the_keepalive_wheel_pings_each_socket_once_when_due() -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)  # the failing socket's report
    wheel = KeepaliveWheel(loop)
    later, soon, cancelled, failing = PingCounter(), PingCounter(), PingCounter(), PingCounter(True)
    wheel.add(later, 30)
    wheel.add(soon, 0.05)
    wheel.add(failing, 0.05)
    wheel.add(cancelled, 0.05).cancel()
    await asyncio.wait_for(soon.pinged.wait(), 5)  # due within a second (RESOLUTION)
    await asyncio.sleep(0.05)
    assert (soon.pings, failing.pings, cancelled.pings, later.pings) == (1, 1, 0, 0)
    assert wheel.timer is not None and wheel.armed_for * wheel.RESOLUTION > loop.time() + 20
    wheel.timer.cancel()


def _read_frame(sock: socket.socket, data: bytes) -> tuple[int, bytes, bytes]:
    """One unmasked server frame with a short payload: (first byte, payload, what follows)."""
    while len(data) < 2 or len(data) < 2 + data[1]:
        chunk = sock.recv(4096)
        assert chunk, f"closed with {data!r} read"
        data += chunk
    end = 2 + data[1]
    return data[0], data[2:end], data[end:]


async def test_keepalive_pings_come_from_the_wheel_and_a_silent_peer_is_closed() -> None:
    config = Config(
        app=_app,
        ws=LeanWebSocketsProtocol,
        lifespan="off",
        ws_ping_interval=0.3,
        ws_ping_timeout=0.5,
    )
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: PROTOCOLS.append(LeanWebSocketsProtocol(config, state, {})) or PROTOCOLS[-1],
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]

    def client() -> tuple[int, int, int]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            rest = _handshake(sock, port).split(b"\r\n\r\n", 1)[1]
            first, payload, rest = _read_frame(sock, rest)
            sock.sendall(Frame(Opcode.PONG, payload).serialize(mask=True))  # answered ...
            second, _, rest = _read_frame(sock, rest)  # ... so the next ping comes
            closing, reason, _ = _read_frame(sock, rest)  # unanswered: the server gives up
            return first, second, int.from_bytes(reason[:2], "big") if closing == 0x88 else 0

    try:
        first, second, code = await asyncio.wait_for(asyncio.to_thread(client), 15)
    finally:
        server.close()
        for task in list(state.tasks):
            task.cancel()
    assert (first, second) == (0x89, 0x89)  # two pings (FIN + opcode 9)
    assert code == CloseCode.INTERNAL_ERROR  # 1011: keepalive ping timeout
    assert isinstance(PROTOCOLS[-1].ping_timer, PingDue | None)
