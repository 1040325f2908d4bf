"""Open websockets per user, counted across every replica in Redis.

Each user has a sorted set ``switchboard:wsauth:conns:{<pk>}``: one member per open socket,
scored with the Redis time at which its lease ends. A connect removes expired members, counts
the rest and adds itself only below ``WS_MAX_CONNECTIONS_PER_USER`` -- one Lua script, so two
replicas cannot both take the last place. Every worker renews the leases of its own sockets every
third of ``WS_CONNECTION_LEASE``; a socket that closes removes its member. A worker that is
killed cannot remove its members: they stop counting when their lease ends, at most
``WS_CONNECTION_LEASE`` seconds later (the honest bound of this design).

When Redis cannot be reached the connection is let through and a warning logged: the channel
layer needs Redis too, so such a socket is refused (1013) or cut off anyway.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from config import env
from config.channel_layers import app_redis

logger = logging.getLogger("switchboard.ws")

# KEYS[1]: the user's set. ARGV: lease seconds, limit (0: none), member.
_ACQUIRE = """
local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_s)
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now_s + lease, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(lease) + 1)
return 1
"""
# KEYS[1]: the user's set. ARGV: lease seconds, member. Renews a member that is still there.
_RENEW = """
local now = redis.call('TIME')
local until_s = tonumber(now[1]) + tonumber(now[2]) / 1000000 + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', until_s, ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


@dataclass(frozen=True)
class Lease:
    key: str
    member: str


def user_key(user_pk: object) -> str:
    # The braces are a Redis Cluster hash tag: a user's set lives on one slot.
    return f"{env.get('CHANNEL_PREFIX')}:wsauth:conns:{{{user_pk}}}"


class _Counter:
    """The per-process state: the leases of this process's sockets and their renewal. Redis
    calls go through the worker's shared, bounded client for the app's own keys
    (``config.channel_layers.app_redis``), so a connection storm opens no pool of its own."""

    def __init__(self) -> None:
        self._leases: set[Lease] = set()
        self._renewer: asyncio.Task | None = None
        self._scripts: tuple[Any, Any, Any] | None = None  # (client, acquire, renew)

    def scripts(self) -> tuple[Any, Any]:
        redis = app_redis()
        if self._scripts is None or self._scripts[0] is not redis.client:
            client = redis.client
            self._scripts = (
                client,
                client.register_script(_ACQUIRE),
                client.register_script(_RENEW),
            )
        return self._scripts[1], self._scripts[2]

    async def acquire(self, user_pk: object) -> Lease | None:
        lease = Lease(user_key(user_pk), uuid.uuid4().hex)
        limit = settings.WS_MAX_CONNECTIONS_PER_USER
        if limit == 0:
            return Lease(lease.key, "")
        acquire_script, _ = self.scripts()
        try:
            async with app_redis().gate:
                taken = await acquire_script(
                    keys=[lease.key], args=[settings.WS_CONNECTION_LEASE, limit, lease.member]
                )
        except Exception as exc:
            logger.warning("connection limit not checked (Redis: %s)", type(exc).__name__)
            return Lease(lease.key, "")  # counted nowhere; release() ignores it
        if not taken:
            return None
        self._leases.add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())
        return lease

    async def release(self, lease: Lease) -> None:
        if not lease.member:
            return
        self._leases.discard(lease)
        redis = app_redis()
        try:
            async with redis.gate:
                await redis.client.zrem(lease.key, lease.member)
        except Exception as exc:  # the lease ends by itself
            logger.warning("connection lease not released (Redis: %s)", type(exc).__name__)

    async def _renew_forever(self) -> None:
        period = settings.WS_CONNECTION_LEASE / 3
        while self._leases:
            await asyncio.sleep(period)
            _, renew_script = self.scripts()
            gate = app_redis().gate
            try:
                for lease in list(self._leases):
                    async with gate:
                        await renew_script(
                            keys=[lease.key], args=[settings.WS_CONNECTION_LEASE, lease.member]
                        )
            except Exception as exc:
                logger.warning("connection leases not renewed (Redis: %s)", type(exc).__name__)


_counter = _Counter()


async def acquire(user_pk: object) -> Lease | None:
    """A lease on one of the user's connection places, or ``None`` when all are taken."""
    return await _counter.acquire(user_pk)


async def release(lease: Lease) -> None:
    await _counter.release(lease)
