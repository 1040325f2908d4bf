"""Group memberships that survive a Redis restart.

The channel layer keeps group memberships in Redis only, and Redis here keeps nothing on disk (an
ephemeral message bus). When redis-server restarts, every group is gone: the sockets are still
open, their consumers still listen, and nothing reaches them any more -- silently, until the
membership renewal half a CHANNEL_GROUP_EXPIRY later. (Found by tests/faults/test_redis_restart.py.)

One :class:`MembershipKeeper` per worker process knows the live group members. While any exist
it asks Redis for its ``run_id`` once a second -- every 0.1 s while Redis is unreachable, and at
once when a consumer's receive or send fails (:meth:`MembershipKeeper.poke`). When Redis was
unreachable or answers with a new ``run_id``, it adds every member back to its groups. Delivery
resumes a fraction of a second after Redis is back, with no client reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any, Protocol

logger = logging.getLogger("switchboard.layer")

#: Seconds between two looks at Redis's run_id, while it answers and while it does not.
WATCH_INTERVAL = 1.0
WATCH_INTERVAL_DOWN = 0.1
#: Memberships restored concurrently (each is one group_add: two Redis commands).
REJOIN_CONCURRENCY = 32


class Member(Protocol):
    channel_layer: Any
    channel_name: str
    joined: list[str]


def _redis_clients(layer: Any) -> list[Any] | None:
    """The layer's Redis clients on this event loop (channels-redis' core layer), else None."""
    connection = getattr(layer, "connection", None)
    ring_size = getattr(layer, "ring_size", None)
    if connection is None or not ring_size:
        return None
    return [connection(index) for index in range(ring_size)]


class MembershipKeeper:
    """Re-adds this process's sockets to their groups after Redis lost or forgot them."""

    def __init__(self) -> None:
        self._members: weakref.WeakSet[Member] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._up: asyncio.Event | None = None
        self.restorations = 0
        #: Since when Redis has been unreachable or its memberships not yet restored.
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        """False from a failure seen until the memberships are back: a message sent meanwhile
        could reach no one, so senders are told ``unavailable`` at once instead."""
        return self.down_since is None

    def add(self, member: Member) -> None:
        self._members.add(member)
        loop = asyncio.get_running_loop()
        idle = self._task is None or self._task.done() or self._task.get_loop() is not loop
        if idle and _redis_clients(member.channel_layer):
            self._wake, self._up = asyncio.Event(), asyncio.Event()
            self._up.set()
            self._task = loop.create_task(
                self._watch(member.channel_layer), name="membership-keeper"
            )

    def discard(self, member: Member) -> None:
        self._members.discard(member)

    async def wait_available(self, at_most: float) -> None:
        """Until the layer is usable again (at most ``at_most`` s): a consumer whose receive
        failed resumes as soon as Redis and its memberships are back, not at its next retry."""
        if self._up is None or self._task is None or self._task.done():
            await asyncio.sleep(at_most)  # nothing watches this layer: plain backoff
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), at_most)

    def poke(self) -> None:
        """A layer operation just failed: look at Redis now rather than at the next tick."""
        if self._wake is not None:
            self._wake.set()

    async def _server_ids(self, layer: Any) -> tuple[str, ...]:
        clients = _redis_clients(layer) or []
        return tuple([(await client.info("server"))["run_id"] for client in clients])

    async def _rejoin_all(self, layer: Any) -> int:
        pairs = [(group, m.channel_name) for m in list(self._members) for group in m.joined]
        limit = asyncio.Semaphore(REJOIN_CONCURRENCY)

        async def rejoin(group: str, channel: str) -> None:
            async with limit:
                await layer.group_add(group, channel)

        await asyncio.gather(*(rejoin(group, channel) for group, channel in pairs))
        return len(pairs)

    async def _watch(self, layer: Any) -> None:
        known: tuple[str, ...] | None = None
        while self._members:
            assert self._wake is not None
            self._wake.clear()  # a poke from now on (even during the look below) counts
            try:
                current = await self._server_ids(layer)
                if self.down_since is not None or (known is not None and current != known):
                    if self.down_since is None:  # restarted between two looks
                        self.down_since = time.monotonic()
                    restored = await self._rejoin_all(layer)
                    self.restorations += 1
                    logger.warning(
                        "channel layer back%s: %d memberships of %d sockets restored",
                        f" after {time.monotonic() - self.down_since:.1f} s",
                        restored,
                        len(self._members),
                    )
            except Exception as exc:  # Redis unreachable: look again shortly
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    logger.warning(
                        "channel layer unreachable (%s); %d sockets stay open and re-join "
                        "their groups when it is back",
                        type(exc).__name__,
                        len(self._members),
                    )
            else:
                known, self.down_since = current, None
            assert self._up is not None
            if self.down_since is None:
                self._up.set()
            else:
                self._up.clear()
            interval = WATCH_INTERVAL if self.down_since is None else WATCH_INTERVAL_DOWN
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
        # No member left: the next add() starts a new watch.
        self.down_since = None


#: One per worker process (one event loop per uvicorn worker).
keeper = MembershipKeeper()
