"""Who is in a room, across every replica and worker process: presence kept in Redis.

Each open chat socket is an entry of its room's sorted set (``presence_key``): the member is
``<user>\\n<connection id>``, the score the moment the entry expires, by Redis's own clock. A
worker process refreshes the entries of all its sockets every ``PRESENCE_TTL / 3`` seconds, one
script call per room, not one task per socket. A socket that closes removes its entry. A worker
that dies (SIGKILL, OOM) runs no cleanup at all: its entries simply stop being refreshed and
drop out of every answer within ``PRESENCE_TTL`` -- expiry, not cleanup code that a dead
process never runs.

Join and leave events (``presence.join`` / ``presence.leave``) are per *user*: sent when a user's
first socket enters the room and when their last one leaves, and only while the room has at most
``PRESENCE_EVENTS_MAX_MEMBERS`` entries, so a 10,000-member room gets no storm of them. A crashed
worker's users get no ``presence.leave``: ask for ``presence`` again to see them gone.

Presence is best effort by design: when Redis cannot be reached, chat goes on, a ``presence``
request is answered ``unavailable``, and the entries are written again by the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from config import env
from config.channel_layers import app_redis

logger = logging.getLogger("chat.presence")

#: Adds or refreshes entries. KEYS[1] the room's set, KEYS[1 + i] the set of the user of
#: ARGV[1 + i] (a member); ARGV[1] the TTL in seconds. Answers the entries of the first member's
#: user and of the room, expired ones removed first.
_TOUCH = """
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
end
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[i])
end
for i = 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], math.ceil(ttl * 2))
end
return {redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[1])}
"""

#: Removes one entry. KEYS[1] the room's set, KEYS[2] its user's set; ARGV[1] the member.
#: Answers the live entries left to that user and to the room.
_LEAVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, 2 do
  redis.call('ZREM', KEYS[i], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
end
return {redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[1])}
"""

#: Drops expired entries and answers the live ones. KEYS[1] the room's set.
_LIST = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) + tonumber(t[2]) / 1e6)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def presence_key(room: str) -> str:
    """The room's sorted set, under CHANNEL_PREFIX (deployments sharing a Redis stay apart). The
    braces are the room channel's Redis Cluster hash tag: one slot per room."""
    return f"{env.get('CHANNEL_PREFIX')}:presence:{{chat.{room}}}"


def user_key(room: str, user: str) -> str:
    """The set of one user's entries in the room (same hash tag, same slot)."""
    return f"{presence_key(room)}:user:{user}"


@dataclass(frozen=True)
class Change:
    """What an enter or a leave did: the user's sockets and the room's entries after it."""

    user_connections: int
    room_size: int

    def announce(self) -> bool:
        """Whether join/leave events go to this room (on, and the room is small enough)."""
        return settings.PRESENCE_EVENTS and self.room_size <= settings.PRESENCE_EVENTS_MAX_MEMBERS


class _ProcessPresence:
    """One event loop's scripts, local entries and refresh task."""

    def __init__(self) -> None:
        redis = app_redis()  # shared, bounded: see APP_REDIS_CONCURRENCY
        self.gate = redis.gate
        self.touch = redis.client.register_script(_TOUCH)
        self.leave = redis.client.register_script(_LEAVE)
        self.list = redis.client.register_script(_LIST)
        self.rooms: dict[str, set[str]] = {}
        self.refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name="chat-presence"
            )

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.PRESENCE_TTL / 3)
            try:
                for room, members in list(self.rooms.items()):
                    if members:
                        ordered = sorted(members)
                        async with self.gate:
                            await self.touch(
                                keys=[presence_key(room)]
                                + [user_key(room, _user_of(m)) for m in ordered],
                                args=[settings.PRESENCE_TTL, *ordered],
                            )
            except Exception as exc:  # Redis down: the next refresh writes them again
                logger.warning("presence refresh failed (%s)", type(exc).__name__)


_STATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ProcessPresence] = (
    weakref.WeakKeyDictionary()
)


def _state() -> _ProcessPresence:
    loop = asyncio.get_running_loop()
    state = _STATES.get(loop)
    if state is None:
        state = _STATES[loop] = _ProcessPresence()
    return state


def _member(user: str, connection_id: str) -> str:
    return f"{user}\n{connection_id}"


def _user_of(member: str) -> str:
    return member.split("\n", 1)[0]


async def enter(room: str, user: str, connection_id: str) -> Change:
    """Add one socket to the room's presence. Raises when Redis cannot be reached."""
    state = _state()
    member = _member(user, connection_id)
    state.rooms.setdefault(room, set()).add(member)
    state.start()
    async with state.gate:
        mine, size = await state.touch(
            keys=[presence_key(room), user_key(room, user)], args=[settings.PRESENCE_TTL, member]
        )
    return Change(int(mine), int(size))


async def leave(room: str, user: str, connection_id: str) -> Change | None:
    """Remove one socket from the room's presence; ``None`` when Redis could not be reached
    (the entry then expires by itself)."""
    state = _state()
    member = _member(user, connection_id)
    members = state.rooms.get(room)
    if members is not None:
        members.discard(member)
        if not members:
            del state.rooms[room]
    try:
        async with state.gate:
            mine, size = await state.leave(
                keys=[presence_key(room), user_key(room, user)], args=[member]
            )
    except Exception as exc:
        logger.warning("presence leave failed for room=%s (%s)", room, type(exc).__name__)
        return None
    return Change(int(mine), int(size))


async def who(room: str) -> dict[str, Any]:
    """The room's live presence: ``{"count": <sockets>, "users": [{"user", "connections"}]}``,
    users sorted by name. Raises when Redis cannot be reached."""
    state = _state()
    async with state.gate:
        entries = await state.list(keys=[presence_key(room)])
    counts: dict[str, int] = {}
    for entry in entries:
        user = _user_of(entry.decode())
        counts[user] = counts.get(user, 0) + 1
    return {
        "count": len(entries),
        "users": [{"user": user, "connections": n} for user, n in sorted(counts.items())],
    }


async def aclose() -> None:
    """Stop this event loop's refresher (tests, shutdown)."""
    state = _STATES.pop(asyncio.get_running_loop(), None)
    if state is not None and state.refresher is not None:
        state.refresher.cancel()
        with contextlib.suppress(BaseException):
            await state.refresher
