"""uvicorn's websockets-sansio protocol, lighter per idle connection.

Every websocket a worker holds keeps its protocol object for as long as it is open; measured
with tracemalloc (loadtests/README.md), these things in it weighed more than they need to:

* the receive ``asyncio.Queue``: three ``collections.deque`` (getters, putters, items), about
  2.3 KB per socket, for a queue that holds zero or one message almost always;
* the ``writable`` ``asyncio.Event``: one more deque for waiters that never exist unless the
  peer stops reading;
* the handshake ``Request`` and ``Response`` (with their header objects), about 2.5 KB per
  socket, which nothing reads after the handshake;
* the same ``Request`` once more, about 3 KB with its headers: websockets' server parser keeps
  it as a local variable of its generator for the life of the connection;
* the scope's headers, kept for the life of the socket: about 80 bytes a header in new
  ``bytes`` and ``tuple`` objects, though most names and many values (set by nginx, or the same
  in every browser) are the same for every socket; :func:`shared_headers` keeps one of each
  per process;
* a timer per socket for its next keepalive ping (an event-loop handle, a bound method, a
  context, and libuv's own timer): the pings due are kept in one-second buckets behind one
  timer per event loop (:class:`KeepaliveWheel`), so a ping goes out up to a second later than
  uvicorn would send it (every WS_PING_INTERVAL, 20 s by default);
* the instance's own ``__dict__``: 34 attributes, beyond the 30 that CPython lets instances of a
  class share one key table for, so each socket had a full dict of its own (1.6 KB). Twelve of
  them (:data:`SERVER_WIDE`) are the same for every connection of a server; they live once per
  server (:class:`ServerWide`), and the remaining ones fit the shared key table.

:class:`LeanWebSocketsProtocol` swaps the first two for minimal equivalents (same methods, same
semantics for the single consumer uvicorn has), writes a text frame sent to many sockets in a
row (a room's message) from bytes built once (:func:`text_frame`), lets go of the handshake
objects once the connection is accepted or refused, handing websockets a fresh frame parser
(the one the handshake parser runs) once the request is read, shares the headers' objects and
the per-server attributes, and keeps its next keepalive ping in the loop's wheel.

It also finishes the closing handshake after a frame over ``WS_MAX_MESSAGE_BYTES``. uvicorn
sends close 1009 as soon as it has read the frame's header and closes the TCP connection at
once, while the client is still sending the rest of the frame. A socket closed with unread data
answers with a TCP reset; behind nginx that reset reached nginx before (or instead of) the close
frame, nginx reset the client in turn, and the client saw no close code (1 try in 7 at 200 KiB,
1 in 2 at 2 MiB; straight to a replica it was 1009 every time). Here the socket stays open after
the close frame: the rest of the refused frame is read and thrown away (never stored), then the
frames after it, until the client's own close frame; then the server closes, with nothing left
unread, and the client has its 1009. A client that stops sending is closed after uvicorn's
``close_timeout`` (10 s) as before.

Everything else is uvicorn's own code. The worker uses it when ``WS_PROTOCOL`` is ``lean`` (the
default; ``websockets-sansio`` is the plain one). It relies on uvicorn and websockets internals:
``pyproject.toml`` pins the versions it was checked against, and
``tests/unit/test_uvicorn_ws.py`` fails with a clear message when those internals change.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

#: A client frame's mask key follows its length field (RFC 6455, 5.2).
MASK_BYTES = 4
#: The longest payload of a control frame (RFC 6455, 5.5).
MAX_CONTROL_PAYLOAD = 125


class LeanQueue:
    """What uvicorn uses of ``asyncio.Queue`` (``put_nowait``, ``get``, ``empty``, ``qsize``),
    unbounded, for one consumer: a list, and a future only while someone waits."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class LeanEvent:
    """``asyncio.Event`` whose waiter list exists only while someone waits."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


#: Attributes uvicorn's protocol sets in ``__init__`` to one value per server (its config, loop,
#: shared state, keepalive settings), never per connection.
SERVER_WIDE = (
    "config",
    "app",
    "loop",
    "logger",
    "root_path",
    "asgi_version",
    "app_state",
    "connections",
    "tasks",
    # Not default_headers: the server replaces its list every second (the Date header), and
    # each connection keeps the one of its own start.
    "close_timeout",
    "ping_interval",
    "ping_timeout",
)


class ServerWide:
    """One of :data:`SERVER_WIDE`: read from, and written once to, the server's shared values
    (``_server_wide``) instead of each connection's ``__dict__``. A second, different value means
    uvicorn now sets it per connection: that fails loudly rather than being shared."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, protocol: Any, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        return protocol._server_wide[self.name]

    def __set__(self, protocol: Any, value: Any) -> None:
        current = protocol._server_wide.setdefault(self.name, value)
        if current is not value and current != value:
            raise RuntimeError(
                f"uvicorn set {self.name} to {value!r} for one connection and {current!r} for "
                "another of the same server: infra/uvicorn_ws.py shares it (SERVER_WIDE)"
            )


#: Request headers whose value is the same for many clients (set by nginx, or by every browser
#: of a kind), and never a secret: one ``(name, value)`` tuple per process serves every socket.
SHARED_HEADER_VALUES = frozenset(
    {
        b"host",
        b"origin",
        b"upgrade",
        b"connection",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"user-agent",
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"pragma",
    }
)
#: At most this many names and pairs are kept: clients choose them.
SHARED_HEADERS_MAX = 512
_shared_headers: dict[Any, Any] = {}


def shared_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with each name, and each pair of a :data:`SHARED_HEADER_VALUES` header, the
    one object this process already holds for it (bytes and tuples are immutable: nobody can
    tell). Each socket keeps its scope's headers for as long as it lives: about 80 bytes per
    header, most of them the same in every scope behind one proxy."""
    shared = _shared_headers
    room = len(shared) < SHARED_HEADERS_MAX
    result = []
    for pair in headers:
        name = pair[0]
        if name in SHARED_HEADER_VALUES:
            known = shared.get(pair)
            if known is None and room:
                known = shared[pair] = (shared.setdefault(name, name), pair[1])
            result.append(known or pair)
            continue
        known_name = shared.get(name)
        if known_name is None and room:
            known_name = shared[name] = name
        result.append((known_name, pair[1]) if known_name is not None else pair)
    return result


class PingDue:
    """A socket's next keepalive ping in a :class:`KeepaliveWheel`; what uvicorn keeps as its
    ``ping_timer`` (it only ever cancels it)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def cancel(self) -> None:
        self.protocol = None


class KeepaliveWheel:
    """The keepalive pings due on one event loop, in buckets of :attr:`RESOLUTION` seconds,
    behind one timer: a socket waiting for its next ping costs a list slot and a
    :class:`PingDue` instead of an event-loop timer (a handle, a bound method, a context).
    A ping goes out up to one :attr:`RESOLUTION` later than it was due."""

    RESOLUTION = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, list[PingDue]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.armed_for = 0  # the tick the timer fires at

    def add(self, protocol: Any, delay: float) -> PingDue:
        due = PingDue(protocol)
        tick = math.ceil((self.loop.time() + delay) / self.RESOLUTION)
        self.buckets.setdefault(tick, []).append(due)
        if self.timer is None or tick < self.armed_for:
            self._arm()
        return due

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        if self.buckets:
            self.armed_for = min(self.buckets)
            self.timer = self.loop.call_at(self.armed_for * self.RESOLUTION, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = (self.loop.time() + 0.01) / self.RESOLUTION  # a timer may fire a hair early
        for tick in sorted(tick for tick in self.buckets if tick <= now):
            for due in self.buckets.pop(tick):
                protocol, due.protocol = due.protocol, None
                if protocol is None:
                    continue  # cancelled: the socket closed, or answered and was rescheduled
                try:
                    protocol.send_keepalive_ping()
                except Exception as exc:  # one socket's failure must not stop the others' pings
                    self.loop.call_exception_handler(
                        {"message": "keepalive ping failed", "exception": exc, "protocol": protocol}
                    )
        self._arm()


class _LastTextFrame:
    """The wire bytes of the last text frame this process sent, by the identity of its text."""

    text: str | None = None
    frame = b""


def text_frame(text: str) -> bytes:
    """The server's (unmasked, uncompressed) text frame for ``text``: what websockets'
    ``send_text`` writes, built once per process for consecutive sends of the same ``str``
    object -- a message delivered to every member of a room is one object per process
    (``chat.consumers.encoded_frame``), so a room of 1,000 costs one encoding per process, not
    1,000 (3 µs each)."""
    if text is not _LastTextFrame.text:
        _LastTextFrame.frame = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
        _LastTextFrame.text = text
    return _LastTextFrame.frame


class ServerProtocolKeepingUnparsedBytes(ServerProtocol):
    """websockets' server protocol, keeping what it had not parsed yet when it failed the
    connection (it throws that away): after an oversize frame's header, the start of the rest of
    that frame and possibly the frames behind it."""

    unparsed_at_failure = b""

    def fail(self, code: int, reason: str = "") -> None:
        self.unparsed_at_failure = bytes(self.reader.buffer)
        super().fail(code, reason)


class RefusedFrameDrain:
    """What a client still sends after its frame was refused as too big: the rest of that frame
    (``skip`` bytes), then whole frames, up to and including its close frame.

    Only frame headers are looked at (RFC 6455, 5.2); payloads are counted off, not stored
    (websockets' own frame parser would keep each one in memory).
    """

    __slots__ = ("pending", "skip")

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.pending = bytearray()

    def feed(self, data: bytes) -> bool:
        """Consume ``data``; ``True`` once the client's close frame has been read in full."""
        if self.skip >= len(data):
            self.skip -= len(data)
            return False
        self.pending += memoryview(data)[self.skip :]
        self.skip = 0
        while True:
            header = _frame_header(self.pending)
            if header is None:
                return False
            opcode, header_length, payload_length = header
            frame_length = header_length + payload_length
            if opcode == Opcode.CLOSE:
                # A control frame carries at most 125 bytes (RFC 6455, 5.5): a longer one is
                # not waited for (it would be stored), the connection just ends.
                return payload_length > MAX_CONTROL_PAYLOAD or len(self.pending) >= frame_length
            consumed = min(frame_length, len(self.pending))
            del self.pending[:consumed]
            if consumed < frame_length:
                self.skip = frame_length - consumed
                return False


def _frame_header(data: bytearray) -> tuple[int, int, int] | None:
    """``(opcode, header length, payload length)`` of the frame ``data`` starts with, or
    ``None`` while its header is incomplete."""
    if len(data) < 2:
        return None
    length, header_length = data[1] & 0x7F, 2
    if length >= 126:
        size = 2 if length == 126 else 8
        if len(data) < 2 + size:
            return None
        length, header_length = int.from_bytes(data[2 : 2 + size], "big"), 2 + size
    if data[1] & 0x80:
        header_length += MASK_BYTES
    return data[0] & 0x0F, header_length, length


class LeanWebSocketsProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sansio websocket protocol with :class:`LeanQueue`, :class:`LeanEvent` and the
    handshake objects released once the handshake is over, and a closing handshake that reads
    the rest of a refused oversize frame (see the module docstring)."""

    #: Set while the rest of a refused oversize frame is read (per instance only then).
    refused_frame: RefusedFrameDrain | None = None

    locals().update({name: ServerWide(name) for name in SERVER_WIDE})

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # First, so that it is there when uvicorn's __init__ sets the SERVER_WIDE attributes.
        self._server_wide: dict[str, Any] = vars(server_state).setdefault(
            "lean_websockets_shared", {}
        )
        super().__init__(config, server_state, app_state, _loop)
        # Same object, one method more (see ServerProtocolKeepingUnparsedBytes): no state added.
        self.conn.__class__ = ServerProtocolKeepingUnparsedBytes
        self.queue = LeanQueue()  # type: ignore[assignment]
        writable = LeanEvent()
        if self.writable.is_set():
            writable.set()
        self.writable = writable  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # a 101: the app gets the scope once this returns
            scope["headers"] = shared_headers(scope["headers"])
        self.release_handshake_parser()

    def schedule_ping(self) -> None:
        """uvicorn's ``schedule_ping``, with the ping due in the loop's :class:`KeepaliveWheel`
        instead of a timer of its own."""
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        wheel = self._server_wide.get("keepalive_wheel")
        if wheel is None or wheel.loop is not self.loop:
            wheel = self._server_wide["keepalive_wheel"] = KeepaliveWheel(self.loop)
        self.ping_timer = wheel.add(self, delay)  # type: ignore[assignment]

    def release_handshake_parser(self) -> None:
        """Swap websockets' server parser, whose generator frame holds the handshake request
        for as long as the connection lives, for the frame parser it delegates to -- only
        while that one waits at a frame boundary with nothing read (it always does right after
        the request: a client sends frames only once it has the handshake response)."""
        parser = self.conn.parser
        frames = getattr(parser, "gi_yieldfrom", None)
        waiting = getattr(frames, "gi_yieldfrom", None)
        if (
            getattr(frames, "gi_code", None) is Protocol.parse.__code__
            and getattr(waiting, "gi_code", None) is StreamReader.at_eof.__code__
            and not self.conn.reader.buffer
        ):
            fresh = Protocol.parse(self.conn)
            next(fresh)
            self.conn.parser = fresh
            parser.close()

    def send_text_now(self, text: str) -> bool:
        """Write a text frame at once, without awaiting, when nothing stands in its way: the
        socket is open, not closing, uncompressed and the peer reads (``writable``). ``False``
        otherwise, with nothing written: the caller sends it through :meth:`send`, which waits
        or raises as uvicorn does. What a room's message to a local member costs here is this
        call, with no task switch (``realtime.consumers.GroupMemberConsumer``)."""
        if (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.initial_response is None
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.conn.extensions
        ):
            self.transport.write(text_frame(text))
            return True
        return False

    async def send(self, message: Any) -> None:
        text = message.get("text")
        if (
            text is not None
            and message["type"] == "websocket.send"
            and message.get("bytes") is None
            and self.handshake_complete
            and not self.close_sent
            and self.initial_response is None
            and not self.conn.extensions
            and self.conn.state is State.OPEN
        ):
            if not self.writable.is_set():  # the peer stopped reading: wait, as uvicorn does
                await self.writable.wait()
            if self.disconnected:
                raise ClientDisconnected()
            if not self.close_sent and self.conn.state is State.OPEN:
                self.transport.write(text_frame(text))
                return
        await super().send(message)
        kind = message["type"]
        if kind in {"websocket.accept", "websocket.close"} or (
            kind == "websocket.http.response.body" and not message.get("more_body", False)
        ):
            # The handshake is answered: the request and response are read no more.
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        drain = self.refused_frame
        if drain is None:
            super().data_received(data)
        elif drain.feed(data):
            # The client's close frame: the closing handshake is complete, nothing is unread.
            self.refused_frame = None
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            self.transport.close()

    def handle_parser_exception(self) -> None:
        failure = self.conn.parser_exc
        too_big = isinstance(failure, PayloadTooBig) and failure.size is not None
        # With a compression extension the size may be the decompressed one: uvicorn's way.
        if not too_big or self.conn.extensions or self.conn.close_sent is None:
            super().handle_parser_exception()
            return
        assert self.conn.close_sent.code == CloseCode.MESSAGE_TOO_BIG
        self.queue.put_nowait(
            {
                "type": "websocket.disconnect",
                "code": self.conn.close_sent.code,
                "reason": self.conn.close_sent.reason,
            }
        )
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        # Not transport.close(): read the rest of the frame, then the client's close frame.
        self.refused_frame = drain = RefusedFrameDrain(MASK_BYTES + failure.size)
        unparsed, self.conn.unparsed_at_failure = self.conn.unparsed_at_failure, b""
        if drain.feed(unparsed):
            self.transport.close()
            return
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        # run_asgi closes the transport when the app ends unless this timer is set.
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
