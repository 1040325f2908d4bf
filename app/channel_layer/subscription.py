"""One event loop's subscription connection to one Redis node (``channel_layer.layer``).

A :class:`Shard` holds the channels a worker process needs on one node -- the server, the
Sentinel master, or one Cluster master -- on one hand-written RESP connection
(``channel_layer.transport``): it (re)connects with backoff, subscribes them all again after an
outage, pings an idle connection, and hands pushed messages to the layer. When the node drops a
channel (``sunsubscribe``: its slot moved), answers ``MOVED``, or is lost, it asks the layer to
re-home the channels on their new owner (``LoopState.rehome``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import hiredis

from channel_layer.stats import STATS
from channel_layer.topology import Node
from channel_layer.transport import RedisUnavailable, RespConnection

if TYPE_CHECKING:
    from channel_layer.layer import LoopState

logger = logging.getLogger("switchboard.layer")

#: Reconnect backoff of the subscriber, seconds (doubling up to the maximum). A refused
#: connection costs next to nothing, and the maximum bounds how long after Redis is back every
#: process is subscribed again.
RECONNECT_FIRST = 0.05
RECONNECT_MAX = 0.5
#: After an outage a process refuses to publish (``unavailable``) for this long once its own
#: subscriptions are back: the other processes reconnect on the same backoff, so by then they
#: are subscribed too, and a message published meanwhile would reach nobody -- silently.
RECOVERY_GRACE = RECONNECT_MAX + 0.25
#: The subscriber PINGs an idle connection this often; no answer within ``socket_timeout``
#: means a dead peer (a half-open TCP connection never reports itself).
PING_INTERVAL = 15.0
#: With Sentinel, how often the subscriber asks whether the master moved (a demoted master
#: keeps answering its clients for a while after a manual failover).
SENTINEL_CHECK_INTERVAL = 1.0


class Shard:
    """This event loop's subscription connection to one Redis node, and the channels it holds.

    With one server or Sentinel there is one shard (:data:`PRIMARY`); with a Cluster, one per
    master that owns a channel this process needs -- never one per group or per socket.
    """

    def __init__(self, state: LoopState, node: Node) -> None:
        self.state = state
        self.node = node
        self.channels: set[bytes] = set()  # wanted on this node
        self.subscribed: set[bytes] = set()  # confirmed by the node
        self.confirming: dict[bytes, asyncio.Future[None]] = {}
        # Until the node confirms an UNSUBSCRIBE, a "subscribe" push for the channel is an old one.
        self.unsubscribing: collections.Counter[bytes] = collections.Counter()
        self.connection: RespConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.down = False
        self.recovering_until = 0.0  # see RECOVERY_GRACE
        self._pong: asyncio.Future[None] | None = None
        self._moved: set[bytes] = set()  # channels the node dropped or redirected: to re-home
        self._rehoming: asyncio.Task[None] | None = None
        if state.topology.sharded:
            self.subscribe_command, self.unsubscribe_command = "SSUBSCRIBE", "SUNSUBSCRIBE"
        else:
            self.subscribe_command, self.unsubscribe_command = "SUBSCRIBE", "UNSUBSCRIBE"

    @property
    def up(self) -> bool:
        return self.connection is not None and self.connection.is_open

    def add(
        self, channel: bytes, future: asyncio.Future[None] | None = None
    ) -> asyncio.Future[None]:
        """Subscribe ``channel`` here; the future resolves when the node confirmed it."""
        loop = self.state.loop
        self.channels.add(channel)
        if channel in self.subscribed and not self.unsubscribing[channel]:
            done = future or loop.create_future()
            if not done.done():
                done.set_result(None)
            return done
        pending = self.confirming.get(channel)
        if pending is None or pending.done():
            pending = self.confirming[channel] = future or loop.create_future()
            if self.up:
                self.connection.write(self.subscribe_command, channel)  # type: ignore[union-attr]
        elif future is not None and future is not pending:
            pending.add_done_callback(lambda f: future.done() or future.set_result(None))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run(), name=f"fanout-layer-{self.node}")
        return pending

    def remove(self, channel: bytes, *, tell_node: bool = True) -> asyncio.Future[None] | None:
        """Stop wanting ``channel`` here; returns its unconfirmed subscription, if any."""
        self.channels.discard(channel)
        self.subscribed.discard(channel)
        future = self.confirming.pop(channel, None)
        if tell_node and self.up:
            self.unsubscribing[channel] += 1
            self.connection.write(self.unsubscribe_command, channel)  # type: ignore[union-attr]
        return future

    async def _run(self) -> None:
        """Hold the subscription connection: (re)connect, subscribe what is wanted, ping."""
        state = self.state
        loop = state.loop
        delay = RECONNECT_FIRST
        down_since: float | None = None
        try:
            while self.channels:
                try:
                    address = await state.topology.address(self.node)
                    connection = await state.open_connection(self.node, self._on_push, address)
                    self.connection = connection
                    self.down = False
                    self.subscribed.clear()
                    self.unsubscribing.clear()
                    for channel in self.channels:
                        future = self.confirming.get(channel)
                        if future is None or future.done():
                            self.confirming[channel] = loop.create_future()
                        connection.write(self.subscribe_command, channel)
                    if down_since is not None:
                        self.recovering_until = loop.time() + RECOVERY_GRACE
                        groups = [
                            g
                            for g in state.groups
                            if state.home.get(state.layer.group_channel(g)) is self
                        ]
                        logger.warning(
                            "channel layer back after %.1f s on %s: %d memberships of %d "
                            "sockets restored (%d groups re-subscribed); publishing resumes "
                            "in %.2f s",
                            time.monotonic() - down_since,
                            state.topology.describe(self.node),
                            sum(len(state.groups[g]) for g in groups),
                            len({c for g in groups for c in state.groups[g]}),
                            len(groups),
                            RECOVERY_GRACE,
                        )
                        down_since, delay = None, RECONNECT_FIRST
                    # With Sentinel, ask every SENTINEL_CHECK_INTERVAL whether the master is
                    # still this one: after a manual failover the old master keeps serving its
                    # clients, as a master, until Sentinel gets round to demoting it.
                    sentinel = state.topology.follows_failovers
                    wait = SENTINEL_CHECK_INTERVAL if sentinel else PING_INTERVAL
                    pinged_at = loop.time()
                    while not connection.lost.done():
                        await asyncio.wait({connection.lost}, timeout=wait)
                        if (
                            sentinel
                            and not connection.lost.done()
                            and await state.master_moved(address)
                        ):
                            connection.close()  # Sentinel names another master: follow it
                            break
                        ping_due = pinged_at + PING_INTERVAL - SENTINEL_CHECK_INTERVAL / 2
                        if connection.lost.done() or (sentinel and loop.time() < ping_due):
                            continue
                        pinged_at = loop.time()
                        if state.process_channel in self.channels:
                            state.sweep()  # once per interval and process, from one shard
                        if not await self.ping():
                            connection.close()
                    raise RedisUnavailable(f"connection lost: {connection.lost.result()}")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.down = True
                    self.subscribed.clear()
                    if self.connection is not None:
                        self.connection.close()
                        self.connection = None
                    if state.process_channel in self.channels:
                        state.ready.clear()
                    if down_since is None:
                        down_since = time.monotonic()
                        STATS.reconnects += 1
                        logger.warning(
                            "channel layer: subscription connection to %s down (%s); messages "
                            "published until it is back do not reach this process",
                            state.topology.describe(self.node),
                            exc,
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    if state.topology.sharded:
                        await state.rehome(self, set(self.channels))
        finally:
            if self.connection is not None:
                self.connection.close()
                self.connection = None
            if state.shards.get(self.node) is self and not self.channels:
                del state.shards[self.node]

    async def ping(self) -> bool:
        """PING the subscription connection: ``False`` when no answer came within the socket
        timeout (a dead peer: a half-open TCP connection never reports itself)."""
        connection = self.connection
        if connection is None or not connection.is_open:
            return False
        self._pong = self.state.loop.create_future()
        connection.write("PING")
        try:
            await asyncio.wait_for(self._pong, self.state.layer.address.timeout)
        except TimeoutError:
            return False
        return True

    def _on_push(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self._on_error(str(reply))
            return
        kind = reply[0]
        if kind == b"message" or kind == b"smessage":
            self.state.on_message(reply[1], reply[2])
        elif kind == b"subscribe" or kind == b"ssubscribe":
            channel = reply[1]
            if self.unsubscribing[channel]:
                return  # an UNSUBSCRIBE sent after it is still on its way
            self.subscribed.add(channel)
            future = self.confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            if channel == self.state.process_channel:
                self.state.ready.set()
        elif kind == b"unsubscribe" or kind == b"sunsubscribe":
            channel = reply[1]
            count = self.unsubscribing[channel]
            if count > 1:
                self.unsubscribing[channel] -= 1
            elif count == 1:
                del self.unsubscribing[channel]
            elif channel in self.channels:
                # Not asked for: the node gave the channel's slot to another node.
                self.subscribed.discard(channel)
                if channel == self.state.process_channel:
                    self.state.ready.clear()
                self._rehome_later({channel})
        elif kind == b"pong" and self._pong is not None and not self._pong.done():
            self._pong.set_result(None)

    def _on_error(self, text: str) -> None:
        STATS.redis_errors += 1
        logger.warning(
            "channel layer: error reply on the subscription connection to %s: %s",
            self.state.topology.describe(self.node),
            text[:200],
        )
        if text.startswith(("MOVED ", "ASK ")) and self.state.topology.sharded:
            slot = int(text.split()[1])
            slot_of = self.state.topology.slot  # type: ignore[attr-defined]
            moved = {c for c in self.channels if c not in self.subscribed and slot_of(c) == slot}
            self._rehome_later(moved)

    def _rehome_later(self, channels: set[bytes]) -> None:
        self._moved |= channels
        if self._rehoming is None or self._rehoming.done():
            self._rehoming = self.state.loop.create_task(self._rehome_moved())

    async def _rehome_moved(self) -> None:
        while self._moved:
            moved, self._moved = self._moved, set()
            await self.state.rehome(self, moved, force=True)
