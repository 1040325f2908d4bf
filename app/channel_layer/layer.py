"""The default channel layer (``CHANNEL_LAYER=fanout``): Redis pub/sub, fanned out per process.

Why: with channels-redis' core layer every group message costs Redis one sorted-set insert per
*member* and each worker one blocking pop per *delivery*; its pub/sub layer sends one PUBLISH per
message but decodes it once per member, subscribes every consumer's own channel in Redis and
serialises publishes behind a lock; and redis-py 8's ``PubSub.get_message`` alone costs tens of
microseconds per message. ``loadtests`` measured all of it (loadtests/README.md). This layer keeps
the Channels layer API (``send``, ``receive``, ``new_channel``, ``group_add``, ``group_discard``,
``group_send``, ``flush``, the ``groups`` and ``flush`` extensions) and builds on channels-redis'
public pieces (``channels_redis.utils.decode_hosts`` for the host formats, the
``channels_redis.serializers`` registry, msgpack by default), but:

* **Groups are process-local.** A worker process SUBSCRIBEs to a group's Redis channel while at
  least one of its consumers is a member, and ``group_add`` returns only once Redis confirmed the
  subscription (a consumer that joins before ``accept()`` cannot miss a message sent after it).
  Memberships live and die with the process: nothing in Redis expires or needs renewing.
* **One PUBLISH per group message, one decode per receiving process.** Each member gets a
  shallow copy of the one decoded message.
* **One subscription per process, not per consumer.** Channel names are
  ``specific.<process token>!<id>``; ``send()`` publishes to the owning process's Redis channel
  with the name in front, and that process routes it to the mailbox.
* **Two plain RESP connections per process and event loop**, parsed by hiredis: one subscribed,
  one for PUBLISH. Publishes issued in the same event-loop turn leave in one write; replies are
  matched in order (pipelining without a lock).
* **Bounded mailboxes, counted drops.** A consumer that falls ``capacity`` messages behind (its
  client does not read) loses its *oldest* message; every drop is counted, logged as a warning
  (at most every ``DROP_LOG_SECONDS``, with the count) and shown in ``/readyz`` under
  ``layer`` (:func:`stats`). Nothing is dropped silently.

Delivery is **at most once**, as with any pub/sub. While a process's subscription connection is
down, messages published meanwhile do not reach that process: the reader reconnects with
backoff, re-subscribes everything, counts the outage (``reconnects``) and logs it as a warning.
A publish that fails or gets no reply within ``socket_timeout`` is *not* retried (a retry could
deliver twice): the error reaches the caller, whose client is told to send again
(``unavailable``). For ``RECOVERY_GRACE`` after its subscriptions are restored, a process
refuses to publish, so that nothing is published while other processes are still re-subscribing
(it would reach nobody, silently).

``REDIS_URL`` may be ``redis://``, ``rediss://`` (TLS; ``?ssl_cert_reqs=none`` and
``?ssl_ca_certs=<file>`` are honoured) or ``unix://``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import types
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

from channels.layers import BaseChannelLayer
from channels_redis.serializers import registry
from channels_redis.utils import decode_hosts

from channel_layer.stats import STATS, stats
from channel_layer.transport import RedisAddress, RedisUnavailable, RespConnection

logger = logging.getLogger("switchboard.layer")

#: Seconds between two warnings about dropped messages (each says how many since the last).
DROP_LOG_SECONDS = 10.0
#: How long ``group_add`` and ``new_channel`` wait for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT = 5.0
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


class _Mailbox:
    """One channel's bounded FIFO with at most one waiting receiver. Small on purpose (one per
    websocket): a message for a waiting receiver is handed over without being stored."""

    __slots__ = ("items", "stale", "waiter")

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] | None = None
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        self.stale = False  # see _LoopState.sweep

    def put(self, message: dict[str, Any], capacity: int) -> bool:
        """Deliver or store; ``False`` when the oldest stored message had to make room."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
            self.waiter = None
            return True
        items = self.items
        if items is None:
            items = self.items = []
        room = len(items) < capacity
        if not room:
            del items[0]
        items.append(message)
        return room

    async def get(self) -> dict[str, Any]:
        self.stale = False
        if self.items:
            return self.items.pop(0)
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                STATS.undeliverable += 1  # handed over as its receiver was being cancelled
            raise
        finally:
            if self.waiter is waiter:
                self.waiter = None


class _LoopState:
    """Everything bound to one event loop: connections, subscriber task, mailboxes, groups."""

    def __init__(self, layer: FanoutChannelLayer, loop: asyncio.AbstractEventLoop) -> None:
        self.layer = layer
        self.loop = loop
        self.token = uuid.uuid4().hex[:16]
        self.process_channel = f"{layer.prefix}:p:{self.token}".encode()
        self.mailboxes: dict[str, _Mailbox] = {}
        self.groups: dict[str, set[str]] = {}  # group -> local channel names
        self.subscribed: set[bytes] = set()
        self.confirming: dict[bytes, asyncio.Future[None]] = {}
        self.publisher: RespConnection | None = None
        self.publisher_lock = asyncio.Lock()
        self.watchdog: asyncio.Task[None] | None = None
        self.unsubscribing: collections.Counter[bytes] = collections.Counter()
        self.subscriber: RespConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.recovering_until = 0.0  # see RECOVERY_GRACE

    # -- publishing ------------------------------------------------------------------------------
    async def _publisher(self) -> RespConnection:
        connection = self.publisher
        if connection is not None and connection.is_open:
            return connection
        async with self.publisher_lock:
            if self.publisher is None or not self.publisher.is_open:
                self.publisher = await RespConnection.open(self.layer.address)
                self.watchdog = self.loop.create_task(
                    self.publisher.watch(self.layer.address.timeout)
                )
            return self.publisher

    async def publish(self, channel: bytes, payload: bytes) -> int:
        # While this process's own subscriptions are down, or other processes may still be
        # re-subscribing, a message could reach nobody: refuse it (the caller is told) instead.
        subscriber_down = self.reader is not None and not self.ready.is_set()
        if subscriber_down or self.loop.time() < self.recovering_until:
            STATS.publish_failures += 1
            raise RedisUnavailable("channel layer: re-subscribing after an outage")
        try:
            connection = self.publisher
            if connection is None or not connection.is_open:
                connection = await self._publisher()
            receivers = await connection.request("PUBLISH", channel, payload)
        except (RedisUnavailable, OSError):
            STATS.publish_failures += 1
            raise
        STATS.published += 1
        return receivers

    # -- subscribing -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.reader is None or self.reader.done():
            self.reader = self.loop.create_task(self._subscribe_forever(), name="fanout-layer")
        try:
            await asyncio.wait_for(self.ready.wait(), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise RedisUnavailable("channel layer: no subscription connection") from None

    async def subscribe(self, channel: bytes) -> None:
        await self.start()
        if channel in self.subscribed and not self.unsubscribing[channel]:
            return
        future = self.confirming.get(channel)
        if future is None:
            future = self.confirming[channel] = self.loop.create_future()
            self.subscriber.write("SUBSCRIBE", channel)  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(asyncio.shield(future), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise RedisUnavailable("Redis did not confirm a subscription") from None

    def unsubscribe(self, channel: bytes) -> None:
        self.subscribed.discard(channel)
        future = self.confirming.pop(channel, None)
        if future is not None and not future.done():
            future.cancel()
        if self.subscriber is not None and self.subscriber.is_open:
            # Until Redis confirms this, a "subscribe" push for the channel is an old one.
            self.unsubscribing[channel] += 1
            self.subscriber.write("UNSUBSCRIBE", channel)

    def sweep(self) -> None:
        """Forget mailboxes nobody reads: not waited on, empty, in no group, and untouched since
        the previous sweep. (A consumer's mailbox always has its receive waiting, except while
        the consumer handles a message; a one-off ``receive`` -- ``/readyz`` -- leaves one.)"""
        members = set().union(*self.groups.values()) if self.groups else set()
        for name, mailbox in list(self.mailboxes.items()):
            if mailbox.waiter is not None or mailbox.items or name in members:
                mailbox.stale = False
            elif mailbox.stale:
                del self.mailboxes[name]
                if "!" not in name:
                    self.unsubscribe(self.layer.named_channel(name))
            else:
                mailbox.stale = True

    def _wanted(self) -> set[bytes]:
        wanted = {self.process_channel}
        wanted.update(self.layer.group_channel(g) for g in self.groups)
        wanted.update(self.layer.named_channel(n) for n in self.mailboxes if "!" not in n)
        return wanted

    async def _subscribe_forever(self) -> None:
        """Hold the subscription connection: (re)connect, subscribe what is wanted, ping."""
        delay = RECONNECT_FIRST
        down_since: float | None = None
        address = self.layer.address
        while True:
            try:
                connection = await RespConnection.open(address, self._on_push)
                self.subscriber = connection
                self.subscribed.clear()
                self.unsubscribing.clear()
                for channel in self._wanted():
                    self.confirming.setdefault(channel, self.loop.create_future())
                    connection.write("SUBSCRIBE", channel)
                if down_since is not None:
                    self.recovering_until = self.loop.time() + RECOVERY_GRACE
                    logger.warning(
                        "channel layer back after %.1f s: %d memberships of %d sockets restored "
                        "(%d groups re-subscribed); publishing resumes in %.2f s",
                        time.monotonic() - down_since,
                        sum(len(m) for m in self.groups.values()),
                        len({c for m in self.groups.values() for c in m}),
                        len(self.groups),
                        RECOVERY_GRACE,
                    )
                    down_since, delay = None, RECONNECT_FIRST
                while not connection.lost.done():
                    await asyncio.wait({connection.lost}, timeout=PING_INTERVAL)
                    self.sweep()
                    if not connection.lost.done():
                        self._pong = self.loop.create_future()
                        connection.write("PING")
                        try:
                            await asyncio.wait_for(self._pong, address.timeout)
                        except TimeoutError:
                            connection.close()
                raise RedisUnavailable(f"connection lost: {connection.lost.result()}")
            except asyncio.CancelledError:
                if self.subscriber is not None:
                    self.subscriber.close()
                raise
            except Exception as exc:
                self.ready.clear()
                if down_since is None:
                    down_since = time.monotonic()
                    STATS.reconnects += 1
                    logger.warning(
                        "channel layer: subscription connection down (%s); messages published "
                        "until it is back do not reach this process",
                        exc,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    _pong: asyncio.Future[None] | None = None

    def _on_push(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            self._on_message(reply[1], reply[2])
        elif kind == b"subscribe":
            channel = reply[1]
            if self.unsubscribing[channel]:
                return  # an UNSUBSCRIBE sent after it is still on its way
            self.subscribed.add(channel)
            future = self.confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            if channel == self.process_channel:
                self.ready.set()
        elif kind == b"unsubscribe":
            channel = reply[1]
            if self.unsubscribing[channel] > 1:
                self.unsubscribing[channel] -= 1
            else:
                del self.unsubscribing[channel]
        elif kind == b"pong" and self._pong is not None and not self._pong.done():
            self._pong.set_result(None)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        STATS.received += 1
        layer = self.layer
        if channel == self.process_channel:
            name, _, payload = data.partition(b"\n")
            self._deliver(name.decode(), layer.deserialize(payload))
            return
        event = layer.deserialize(data)
        if channel.startswith(layer.group_prefix):
            for name in self.groups.get(channel[len(layer.group_prefix) :].decode(), ()):
                self._deliver(name, dict(event))
        else:
            self._deliver(channel[len(layer.named_prefix) :].decode(), event)

    def _deliver(self, name: str, message: dict[str, Any]) -> None:
        mailbox = self.mailboxes.get(name)
        if mailbox is None:
            STATS.undeliverable += 1
            return
        STATS.delivered += 1
        if not mailbox.put(message, self.layer.capacity):
            self.layer.count_drop(name)

    async def aclose(self) -> None:
        for task in (self.reader, self.watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for connection in (self.publisher, self.subscriber):
            if connection is not None:
                connection.close()


class FanoutChannelLayer(BaseChannelLayer):
    """See the module docstring. ``hosts`` takes one Redis in channels-redis' host formats."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        hosts: Iterable[Any] | None = None,
        prefix: str = "asgi",
        capacity: int = 1000,
        serializer_format: str = "msgpack",
        symmetric_encryption_keys: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(capacity=capacity, **kwargs)
        decoded = decode_hosts(hosts)
        if len(decoded) != 1:
            raise ValueError("FanoutChannelLayer takes exactly one Redis host (no sharding)")
        self.address = RedisAddress.from_host(decoded[0])
        self.prefix = prefix
        self.group_prefix = f"{prefix}:g:".encode()
        self.named_prefix = f"{prefix}:c:".encode()
        self._serializer = registry.get_serializer(
            serializer_format, symmetric_encryption_keys=symmetric_encryption_keys
        )
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._drops_logged_at = -DROP_LOG_SECONDS
        self._drops_unlogged = 0

    # -- helpers -----------------------------------------------------------------------------------
    def serialize(self, message: dict[str, Any]) -> bytes:
        return self._serializer.serialize(message)

    def deserialize(self, data: bytes) -> dict[str, Any]:
        return self._serializer.deserialize(data)

    def group_channel(self, group: str) -> bytes:
        return self.group_prefix + group.encode()

    def named_channel(self, name: str) -> bytes:
        return self.named_prefix + name.encode()

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState(self, loop)
            self._close_with(loop)
        return state

    def _close_with(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close this loop's connections when the loop closes (``async_to_sync`` callers run
        each call in a loop of its own)."""
        original = loop.close
        states = self._states

        def close(self_loop: asyncio.AbstractEventLoop) -> None:
            state = states.pop(self_loop, None)
            if state is not None and not self_loop.is_running() and not self_loop.is_closed():
                with contextlib.suppress(Exception):
                    self_loop.run_until_complete(state.aclose())
            self_loop.close = original  # type: ignore[method-assign]
            original()

        loop.close = types.MethodType(close, loop)  # type: ignore[method-assign]

    def count_drop(self, channel: str) -> None:
        STATS.dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_SECONDS:
            logger.warning(
                "channel layer: dropped %d message(s) for consumers more than %d messages "
                "behind (latest: %s); %d dropped since start",
                self._drops_unlogged,
                self.capacity,
                channel,
                STATS.dropped,
            )
            self._drops_logged_at = now
            self._drops_unlogged = 0

    # -- channel layer API -------------------------------------------------------------------------
    async def new_channel(self, prefix: str = "specific.") -> str:
        state = self._state()
        await state.start()
        name = f"{prefix}{state.token}!{uuid.uuid4().hex[:12]}"
        state.mailboxes[name] = _Mailbox()
        return name

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send to one channel: a process-specific one goes to its owner's process channel."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        payload = self.serialize(message)
        if "!" in channel:
            token = channel.split("!", 1)[0].rsplit(".", 1)[-1]
            target = f"{self.prefix}:p:{token}".encode()
            payload = channel.encode() + b"\n" + payload
        else:
            target = self.named_channel(channel)
        await self._state().publish(target, payload)

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)
        state = self._state()
        mailbox = state.mailboxes.get(channel)
        if mailbox is None:
            mailbox = state.mailboxes[channel] = _Mailbox()
        if "!" not in channel:
            await state.subscribe(self.named_channel(channel))
        try:
            return await mailbox.get()
        except asyncio.CancelledError:
            # Channels cancels a consumer's receive when the consumer ends: forget its channel.
            if not mailbox.items and not any(channel in m for m in state.groups.values()):
                if state.mailboxes.get(channel) is mailbox:
                    del state.mailboxes[channel]
                if "!" not in channel:
                    state.unsubscribe(self.named_channel(channel))
            raise

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        state = self._state()
        state.mailboxes.setdefault(channel, _Mailbox())
        members = state.groups.setdefault(group, set())
        members.add(channel)
        try:
            await state.subscribe(self.group_channel(group))
        except BaseException:
            members.discard(channel)
            if not members and state.groups.get(group) is members:
                del state.groups[group]
            raise

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        state = self._state()
        members = state.groups.get(group)
        if members is None or channel not in members:
            return
        members.discard(channel)
        if not members:
            del state.groups[group]
            state.unsubscribe(self.group_channel(group))

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        await self._state().publish(self.group_channel(group), self.serialize(message))

    async def flush(self) -> None:
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.aclose()

    def stats(self) -> dict[str, int]:
        """This process's counters (see :class:`LayerStats`)."""
        return stats()
