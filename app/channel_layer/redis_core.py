"""The Redis channel layer, with a connection pool that gives back what a burst opened.

channels-redis creates one ``redis.asyncio.ConnectionPool`` per worker process. That pool opens
a new connection whenever all of its connections are busy and never closes one: after a burst
(2,000 sockets closing at once each run ``group_discard``) every worker keeps hundreds of idle
connections to Redis for the rest of its life -- measured here as Redis ``connected_clients``
going from 7 to 1,740 and staying there. This layer's pool still opens as many connections as a
burst needs (up to ``max_connections``), but keeps at most ``max_idle_connections`` idle ones
and closes the rest as they are released.

``receive`` is also made to honour cancellation. On Python 3.11, ``asyncio.wait_for`` returns the
inner result and drops a cancellation that arrives just as the inner call finishes (CPython
gh-86296, fixed in 3.12); redis-py sends every command through ``wait_for`` when a socket
timeout is set. A consumer whose socket closed while its receive was sending BZPOPMIN then kept
blocking in BZPOPMIN forever: the worker's graceful shutdown waited the whole GRACEFUL_TIMEOUT
(found by tests/faults/test_rolling_restart.py), and outside shutdowns the task leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer as _StockRedisChannelLayer
from redis.asyncio import ConnectionPool

logger = logging.getLogger("switchboard.layer")

#: How often, and how many times, a cancelled receive is cancelled again until it stops.
RECANCEL_EVERY_SECONDS = 0.05
RECANCEL_ATTEMPTS = 100


class IdleCappedConnectionPool(ConnectionPool):
    """A ``ConnectionPool`` that keeps at most ``max_idle_connections`` idle connections."""

    def __init__(self, *args: Any, max_idle_connections: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_idle_connections = max_idle_connections

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        surplus = []
        # No await between the checks and the pops: atomic within the event loop. Index 0 is
        # the least recently used connection (the pool hands out from the end).
        while len(self._available_connections) > self.max_idle_connections:
            surplus.append(self._available_connections.pop(0))
        for extra in surplus:
            with contextlib.suppress(Exception):  # it is gone either way
                await extra.disconnect()


class RedisChannelLayer(_StockRedisChannelLayer):
    """``channels_redis.core.RedisChannelLayer`` whose pools are :class:`IdleCappedConnectionPool`.

    Host entries are dicts with ``address`` (a redis:// or rediss:// URL) and pool/connection
    options, as ``config.channel_layers`` builds them; other host forms use the stock pool.
    """

    def create_pool(self, index: int) -> ConnectionPool:
        host = dict(self.hosts[index])
        if "address" not in host:  # sentinel or host/port entries: not built by our settings
            return super().create_pool(index)
        return IdleCappedConnectionPool.from_url(host.pop("address"), **host)

    async def receive(self, channel: str) -> dict[str, Any]:
        """The stock receive, run as a task of its own that is cancelled until it has stopped."""
        inner = asyncio.ensure_future(super().receive(channel))
        try:
            await asyncio.wait({inner})
        except asyncio.CancelledError:
            for _ in range(RECANCEL_ATTEMPTS):
                inner.cancel()
                done, _ = await asyncio.wait({inner}, timeout=RECANCEL_EVERY_SECONDS)
                if done:
                    break
            else:
                logger.warning("a cancelled receive on %s would not stop", channel)
            if inner.done() and not inner.cancelled():
                inner.exception()  # retrieved: a late error is no news to anyone
            raise
        return inner.result()
