"""uvicorn's websockets-sansio protocol, lighter per idle connection.

Every websocket a worker holds keeps its protocol object for as long as it is open; measured
with tracemalloc (loadtests/README.md), three things in it weigh more than they do:

* the receive ``asyncio.Queue``: three ``collections.deque`` (getters, putters, items), about
  2.3 KB per socket, for a queue that holds zero or one message almost always;
* the ``writable`` ``asyncio.Event``: one more deque for waiters that never exist unless the
  peer stops reading;
* the handshake ``Request`` and ``Response`` (with their header objects), about 2.5 KB per
  socket, which nothing reads after the handshake.

:class:`LeanWebSocketsProtocol` swaps the first two for minimal equivalents (same methods, same
semantics for the single consumer uvicorn has) and lets go of the handshake objects once the
connection is accepted or refused. Everything else is uvicorn's own code. The worker uses it
when ``WS_PROTOCOL`` is ``lean`` (the default; ``websockets-sansio`` is the plain one).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


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


class LeanWebSocketsProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sansio websocket protocol with :class:`LeanQueue`, :class:`LeanEvent` and the
    handshake objects released once the handshake is over (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # type: ignore[assignment]
        writable = LeanEvent()
        if self.writable.is_set():
            writable.set()
        self.writable = writable  # type: ignore[assignment]

    async def send(self, message: Any) -> None:
        await super().send(message)
        kind = message["type"]
        if kind in {"websocket.accept", "websocket.close"} or (
            kind == "websocket.http.response.body" and not message.get("more_body", False)
        ):
            # The handshake is answered: the request and response are read no more.
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
