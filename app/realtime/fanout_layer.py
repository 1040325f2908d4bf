"""A Redis pub/sub channel layer that fans out once per process (``CHANNEL_LAYER=fanout``).

Why: with channels-redis' core layer every group message costs Redis one sorted-set insert per
*member* and every worker one blocking pop per *delivery*; its pub/sub layer sends one PUBLISH
per message but then decodes it once per member, subscribes every consumer's own channel in
Redis and serialises publishes behind a lock. Measured with ``loadtests`` both were far from
what a plain websockets server does with the same Redis. This layer keeps the Channels layer
API (``send``, ``receive``, ``new_channel``, ``group_add``, ``group_discard``, ``group_send``,
``flush``) and builds on channels-redis' public pieces (``channels_redis.utils.create_pool`` and
``decode_hosts``, the ``channels_redis.serializers`` registry, msgpack by default), but:

* **Groups are process-local.** A worker process SUBSCRIBEs to a group's Redis channel while at
  least one of its consumers is a member, and waits for Redis to confirm before ``group_add``
  returns (a consumer that joined before ``accept()`` cannot miss a message sent after it).
  Memberships live and die with the process: there is nothing to expire or renew in Redis.
* **One PUBLISH per group message, one decode per receiving process.** The reader task hands
  each member a shallow copy of the one decoded message.
* **One subscription per process, not per consumer.** Channel names are
  ``specific.<process token>!<id>``; ``send()`` publishes to the owning process's channel with
  the name in front, and that process routes it to the mailbox.
* **Publishes are pipelined.** Every PUBLISH issued while one pipeline is in flight goes out in
  the next one: one round trip per batch instead of one per message, with no lock.
* **Bounded mailboxes, counted drops.** A consumer that falls ``capacity`` messages behind (its
  client does not read) loses its oldest message; every such drop is counted, logged as a
  warning (at most every ``DROP_LOG_SECONDS``), and shown in ``/readyz`` (``layer`` details,
  :func:`stats`). Nothing is dropped silently.

Delivery is at most once, as with any pub/sub: a message published while a process's
subscription connection is down does not reach that process. The reader reconnects with
backoff, re-subscribes everything, counts the outage (``reconnects``) and logs it as a
warning. A publish that fails is *not* retried (a retried pipeline could deliver twice): the
error reaches the caller, whose client is told to send again (``unavailable``).
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
from dataclasses import asdict, dataclass
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from channels_redis.serializers import registry
from channels_redis.utils import create_pool, decode_hosts
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

logger = logging.getLogger("switchboard.layer")

#: Seconds between two warnings about dropped messages (each says how many since the last).
DROP_LOG_SECONDS = 10.0
#: How long ``group_add`` waits for Redis to confirm a new subscription.
SUBSCRIBE_TIMEOUT = 5.0
#: Reconnect backoff of the reader, seconds (doubling up to the maximum).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 2.0


@dataclass
class LayerStats:
    """Counters of one worker process (every event loop of it). ``dropped`` must stay 0."""

    published: int = 0
    publish_failures: int = 0
    received: int = 0  # pub/sub messages read from Redis
    delivered: int = 0  # messages put into a consumer's mailbox
    dropped: int = 0  # messages pushed out of a full mailbox (the consumer was too slow)
    undeliverable: int = 0  # messages for a channel that is gone (its consumer disconnected)
    reconnects: int = 0  # subscription connection lost and re-established

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: Process-wide counters (``/readyz`` shows them).
STATS = LayerStats()


def stats() -> dict[str, int]:
    return STATS.as_dict()


class _Mailbox:
    """A bounded FIFO of one channel with at most one waiting receiver (cheaper than a Queue)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[dict[str, Any]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, message: dict[str, Any], capacity: int) -> bool:
        """Append; ``False`` when the oldest message had to make room."""
        room = True
        if len(self.items) >= capacity:
            self.items.popleft()
            room = False
        self.items.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return room

    async def get(self) -> dict[str, Any]:
        while not self.items:
            waiter = asyncio.get_running_loop().create_future()
            self.waiter = waiter
            try:
                await waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class _LoopState:
    """Everything bound to one event loop: Redis clients, the reader, mailboxes, groups."""

    def __init__(self, layer: FanoutChannelLayer, loop: asyncio.AbstractEventLoop) -> None:
        self.layer = layer
        self.loop = loop
        self.token = uuid.uuid4().hex[:16]
        self.process_channel = f"{layer.prefix}:p:{self.token}".encode()
        # No silent retries: a retried pipeline could publish a message twice (the caller is
        # told instead), and a reconnect inside redis-py would hide an outage from the reader.
        host = dict(layer.host, retry=Retry(NoBackoff(), 0))
        self.redis = aioredis.Redis(connection_pool=create_pool(host))
        self.subscriber = aioredis.Redis(connection_pool=create_pool(dict(host)))
        self.pubsub: Any = None
        self.mailboxes: dict[str, _Mailbox] = {}
        self.groups: dict[str, set[str]] = {}  # group -> local channel names
        self.subscribed: set[bytes] = set()
        self.confirming: dict[bytes, asyncio.Future[None]] = {}
        self.sub_lock = asyncio.Lock()
        self.pending: list[tuple[bytes, bytes, asyncio.Future[int]]] = []
        self.flusher: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    # -- publishing ----------------------------------------------------------------------------
    async def publish(self, channel: bytes, payload: bytes) -> int:
        future: asyncio.Future[int] = self.loop.create_future()
        self.pending.append((channel, payload, future))
        if self.flusher is None:
            self.flusher = self.loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for channel, payload, _ in batch:
                            pipe.publish(channel, payload)
                        results = await pipe.execute()
                except Exception as exc:
                    STATS.publish_failures += len(batch)
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                STATS.published += len(batch)
                for (_, _, future), receivers in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(receivers)
        finally:
            self.flusher = None

    # -- subscribing ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.reader is None:
            self.reader = self.loop.create_task(self._read_forever(), name="fanout-layer-reader")
        await asyncio.wait_for(self.ready.wait(), SUBSCRIBE_TIMEOUT)

    async def subscribe(self, channel: bytes) -> None:
        await self.start()
        async with self.sub_lock:
            if channel in self.subscribed:
                return
            future = self.confirming.get(channel)
            if future is None:
                future = self.confirming[channel] = self.loop.create_future()
                await self.pubsub.subscribe(channel)
        await asyncio.wait_for(asyncio.shield(future), SUBSCRIBE_TIMEOUT)

    async def unsubscribe(self, channel: bytes) -> None:
        async with self.sub_lock:
            if channel in self.subscribed or channel in self.confirming:
                self.subscribed.discard(channel)
                self.confirming.pop(channel, None)
                with contextlib.suppress(Exception):  # a lost connection unsubscribes anyway
                    await self.pubsub.unsubscribe(channel)

    def _wanted(self) -> set[bytes]:
        wanted = {self.process_channel}
        wanted.update(self.layer.group_channel(g) for g in self.groups)
        wanted.update(
            self.layer.named_channel(name) for name in self.mailboxes if "!" not in name
        )
        return wanted

    async def _connect(self) -> None:
        """(Re)open the subscription connection and subscribe everything this loop needs."""
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
        self.pubsub = self.subscriber.pubsub()
        wanted = self._wanted()
        self.subscribed.clear()
        for channel in wanted:
            self.confirming.setdefault(channel, self.loop.create_future())
        await self.pubsub.subscribe(*wanted)

    async def _read_forever(self) -> None:
        delay = RECONNECT_FIRST
        down_since: float | None = None
        while True:
            try:
                await self._connect()
                while True:
                    message = await self.pubsub.get_message(timeout=None)
                    if message is not None:
                        self._on_message(message)
                        if down_since is not None and self.ready.is_set():
                            logger.warning(
                                "channel layer: subscriptions restored after %.1f s",
                                time.monotonic() - down_since,
                            )
                            down_since = None
                            delay = RECONNECT_FIRST
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ready.clear()
                if down_since is None:
                    down_since = time.monotonic()
                    STATS.reconnects += 1
                    logger.warning(
                        "channel layer: subscription connection lost (%s: %s); messages "
                        "published until it is back do not reach this process",
                        type(exc).__name__, exc,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if kind != "message":
            if kind == "subscribe":
                self.subscribed.add(channel)
                future = self.confirming.pop(channel, None)
                if future is not None and not future.done():
                    future.set_result(None)
                if channel == self.process_channel:
                    self.ready.set()
            return
        STATS.received += 1
        layer = self.layer
        data = message["data"]
        if channel == self.process_channel:
            name, _, payload = data.partition(b"\n")
            self._deliver(name.decode(), layer.deserialize(payload))
            return
        event = layer.deserialize(data)
        group = channel[len(layer.group_prefix):].decode() if channel.startswith(
            layer.group_prefix
        ) else None
        if group is not None:
            for name in self.groups.get(group, ()):
                self._deliver(name, dict(event))
        else:
            self._deliver(channel[len(layer.named_prefix):].decode(), event)

    def _deliver(self, name: str, message: dict[str, Any]) -> None:
        mailbox = self.mailboxes.get(name)
        if mailbox is None:
            STATS.undeliverable += 1
            return
        STATS.delivered += 1
        if not mailbox.put(message, self.layer.capacity):
            self.layer.count_drop(name)

    async def aclose(self) -> None:
        for task in (self.reader, self.flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
        for client in (self.redis, self.subscriber):
            with contextlib.suppress(Exception):
                await client.aclose(close_connection_pool=True)


class FanoutChannelLayer(BaseChannelLayer):
    """See the module docstring. ``hosts`` takes one Redis (channels-redis' host formats)."""

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
        self.host = decoded[0]
        self.prefix = prefix
        self.group_prefix = f"{prefix}:g:".encode()
        self.named_prefix = f"{prefix}:c:".encode()
        self._serializer = registry.get_serializer(
            serializer_format, symmetric_encryption_keys=symmetric_encryption_keys
        )
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._drops_logged_at = 0.0
        self._drops_unlogged = 0

    # -- helpers -------------------------------------------------------------------------------
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
        """Close this loop's connections when the loop closes (``async_to_sync`` callers)."""
        original = loop.close
        states = self._states

        def close(self_loop: asyncio.AbstractEventLoop) -> None:
            state = states.pop(self_loop, None)
            if state is not None and not self_loop.is_running():
                with contextlib.suppress(Exception):
                    self_loop.run_until_complete(state.aclose())
            self_loop.close = original
            original()

        loop.close = types.MethodType(close, loop)

    def count_drop(self, channel: str) -> None:
        STATS.dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_SECONDS:
            logger.warning(
                "channel layer: dropped %d message(s) for consumers more than %d messages "
                "behind (latest: %s); %d dropped since start",
                self._drops_unlogged, self.capacity, channel, STATS.dropped,
            )
            self._drops_logged_at = now
            self._drops_unlogged = 0

    # -- channel layer API ---------------------------------------------------------------------
    async def new_channel(self, prefix: str = "specific.") -> str:
        state = self._state()
        await state.start()
        name = f"{prefix}{state.token}!{uuid.uuid4().hex[:12]}"
        state.mailboxes[name] = _Mailbox()
        return name

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        state = self._state()
        payload = self.serialize(message)
        if "!" in channel:
            token = channel.split("!", 1)[0].rsplit(".", 1)[-1]
            target = f"{self.prefix}:p:{token}".encode()
            payload = channel.encode() + b"\n" + payload
        else:
            target = self.named_channel(channel)
        if len(payload) > 512 * 1024 * 1024:
            raise ChannelFull("message too large")
        await state.publish(target, payload)

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
            if mailbox.waiter is None and not mailbox.items and not self._is_member(state, channel):
                state.mailboxes.pop(channel, None)
            raise

    @staticmethod
    def _is_member(state: _LoopState, channel: str) -> bool:
        return any(channel in members for members in state.groups.values())

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
        if not any(channel in m for m in state.groups.values()):
            mailbox = state.mailboxes.get(channel)
            if mailbox is not None and mailbox.waiter is None:
                state.mailboxes.pop(channel, None)
        if not members:
            del state.groups[group]
            await state.unsubscribe(self.group_channel(group))

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
