"""The layer's Redis transport: plain RESP2 connections parsed by hiredis.

This is the hot path of the default layer (``channel_layer.layer``): pipelined commands whose
replies resolve futures in order, and pub/sub pushes handed to a callback without going through
a general-purpose client. ``loadtests/README.md`` measures what it buys over redis-py's
``PubSub.get_message``. It knows nothing of topology (which server to talk to): that is
``channel_layer.topology``'s job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from observability.metrics import observe_redis_round_trip

logger = logging.getLogger("switchboard.layer")

#: Pub/sub pushes (RESP2: arrays whose first element names the kind), sharded ones included.
_PUSH_KINDS = frozenset(
    {b"message", b"subscribe", b"unsubscribe", b"pong", b"smessage", b"ssubscribe", b"sunsubscribe"}
)


class RedisUnavailable(ConnectionError):
    """The layer's Redis connection failed or did not answer in time."""


class RedisRedirect(RedisUnavailable):
    """A cluster node answered ``MOVED`` or ``ASK``: the command was *not* executed there (so it
    is safe to send again to the slot's new owner)."""


@dataclass(frozen=True)
class RedisAddress:
    """Where and how to reach Redis, from a channels-redis host entry."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # unix socket
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    tls: ssl.SSLContext | None = None
    tls_ca_file: str | None = None  # what ``tls`` trusts, for the topology's library clients
    connect_timeout: float = 5.0
    timeout: float = 15.0
    db: int = 0  # pub/sub ignores it; the layer puts it in its channel names (isolation)

    @classmethod
    def from_host(cls, entry: dict[str, Any]) -> RedisAddress:
        connect_timeout = float(entry.get("socket_connect_timeout") or 5.0)
        timeout = float(entry.get("socket_timeout") or 15.0)
        if "address" not in entry:
            return cls(
                host=entry.get("host", "localhost"),
                port=int(entry.get("port", 6379)),
                password=entry.get("password"),
                connect_timeout=connect_timeout,
                timeout=timeout,
                db=int(entry.get("db", 0)),
            )
        url = urlsplit(entry["address"])
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        username = unquote(url.username) if url.username else None
        password = unquote(url.password) if url.password else query.get("password")
        db = query.get("db") or (url.path.strip("/") if url.scheme != "unix" else "") or "0"
        if not db.isdigit():
            raise ValueError(f"Redis URL database {db!r} is not a number")
        common = {
            "username": username,
            "password": password,
            "connect_timeout": connect_timeout,
            "timeout": timeout,
            "db": int(db),
        }
        if url.scheme == "unix":
            return cls(path=unquote(url.path), **common)
        if url.scheme not in {"redis", "rediss"}:
            raise ValueError(f"unsupported Redis URL scheme {url.scheme!r}")
        tls = None
        if url.scheme == "rediss":
            tls = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
            if query.get("ssl_cert_reqs", "required").lower() in {"none", "cert_none"}:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        return cls(
            host=url.hostname or "localhost",
            port=url.port or 6379,
            tls=tls,
            tls_ca_file=query.get("ssl_ca_certs"),
            **common,
        )


def reply_error(reply: hiredis.ReplyError) -> RedisUnavailable:
    """The exception for an error reply: :class:`RedisRedirect` for MOVED / ASK."""
    text = str(reply)
    if text.startswith(("MOVED ", "ASK ")):
        return RedisRedirect(f"Redis: {text}")
    return RedisUnavailable(f"Redis: {text}")


class RespConnection(asyncio.Protocol):
    """One RESP2 connection: pipelined commands whose replies resolve futures in order, and
    pub/sub pushes handed to ``on_push``. Parsing is hiredis.

    On a subscription connection (``on_push`` given), an error reply nobody waits for -- the
    answer to a SUBSCRIBE or PING written with :meth:`write` -- goes to ``on_push`` too, as a
    ``hiredis.ReplyError``: the layer logs and counts it instead of losing it."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self.on_push = on_push
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._outgoing: list[bytes] = []

    @classmethod
    async def open(
        cls, address: RedisAddress, on_push: Callable[[list[Any]], None] | None = None
    ) -> RespConnection:
        loop = asyncio.get_running_loop()
        if address.path is not None:
            connecting = loop.create_unix_connection(lambda: cls(on_push), address.path)
        else:
            connecting = loop.create_connection(
                lambda: cls(on_push),
                address.host,
                address.port,
                ssl=address.tls,
                server_hostname=address.host if address.tls else None,
            )
        try:
            transport, connection = await asyncio.wait_for(connecting, address.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis: {exc or type(exc).__name__}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if address.password is not None:
            credentials = [address.username] if address.username else []
            try:
                await connection.call(address.timeout, "AUTH", *credentials, address.password)
            except BaseException:
                connection.close()
                raise
        return connection

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if (
                self.on_push is not None
                and type(reply) is list
                and reply
                and reply[0] in _PUSH_KINDS
            ):
                self.on_push(reply)
            elif self.waiting:
                future = self.waiting.popleft()
                observe_redis_round_trip(self.sent_at.popleft())
                if future.done():
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(reply_error(reply))
                else:
                    future.set_result(reply)
            elif self.on_push is not None and isinstance(reply, hiredis.ReplyError):
                self.on_push(reply)
            else:
                logger.warning("channel layer: unexpected reply from Redis dropped: %.200r", reply)

    def connection_lost(self, exc: Exception | None) -> None:
        error = RedisUnavailable(f"Redis connection lost: {exc or 'closed'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(exc)

    # -- commands --------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.lost.done()

    def write(self, *args: Any) -> None:
        """Queue a command whose reply nobody waits for (SUBSCRIBE: its answer is a push).
        Everything queued in one event-loop turn leaves in one write."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(hiredis.pack_command(args))

    def _flush(self) -> None:
        data, self._outgoing = b"".join(self._outgoing), []
        if self.is_open:
            self.transport.write(data)  # type: ignore[union-attr]

    def request(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a command; the future gets its reply."""
        if not self.is_open:
            raise RedisUnavailable("Redis connection is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append(future)
        self.sent_at.append(time.monotonic())  # uvloop's loop.time() has 1 ms resolution
        self.write(*args)
        return future

    async def watch(self, limit: float) -> None:
        """Close the connection when a reply is more than ``limit`` seconds late (a dead or
        wedged peer); one timer per connection instead of one per command."""
        while not self.lost.done():
            await asyncio.wait({self.lost}, timeout=min(1.0, limit))
            if self.sent_at and time.monotonic() - self.sent_at[0] > limit:
                logger.warning("channel layer: Redis did not answer within %g s", limit)
                self.close()
                return

    async def call(self, limit: float, *args: Any) -> Any:
        """Send a command and wait for its reply; a reply more than ``limit`` seconds late
        closes the connection (the peer is gone or wedged) and raises."""
        future = self.request(*args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            self.close()
            raise RedisUnavailable(f"Redis did not answer {args[0]} within {limit:g} s") from None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
