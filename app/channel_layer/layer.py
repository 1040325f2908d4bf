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
* **Two plain RESP connections per Redis node a process needs** (per event loop), parsed by
  hiredis (``channel_layer.transport``): one subscribed, one for publishing. Publishes issued in
  the same event-loop turn leave in one write; replies are matched in order (pipelining without
  a lock). One server or a Sentinel master is one node; on a Redis Cluster
  (``channel_layer.topology``) each channel lives on the master owning its slot, with
  ``SSUBSCRIBE`` / ``SPUBLISH`` (sharded pub/sub): a process holds one subscription connection
  per shard it needs, never one per group or per socket.
* **Channel names isolate deployments and spread groups.** ``<prefix>:<db>:g:{<group>}``,
  ``<prefix>:<db>:c:{<name>}``, ``<prefix>:<db>:p:{<process token>}``: pub/sub ignores database
  numbers, so the number is in the name (two deployments sharing one Redis never see each
  other's messages), and the braces are the cluster hash tag (a group is one slot; groups
  spread over the shards).
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

**Failover and slot migration** (Sentinel, Cluster) are followed without help: a lost node, a
``MOVED`` reply or the server's ``sunsubscribe`` push (its slot moved) make the subscriber ask
the topology again and subscribe on the new owner; a publish answered ``MOVED`` was not executed
and is sent once more to the new owner, after the same grace. **Nothing is lost silently:**
every message carries ``<publisher token> <sequence number>`` per channel in front of its
payload, and a receiver that sees a gap counts the missing messages (``lost``) and logs them.

``REDIS_URL`` may be ``redis://``, ``rediss://`` (TLS; ``?ssl_cert_reqs=none`` and
``?ssl_ca_certs=<file>`` are honoured) or ``unix://``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import types
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from channels.layers import BaseChannelLayer
from channels_redis.serializers import registry
from channels_redis.utils import decode_hosts

from channel_layer.history import (
    APPEND_SCRIPT,
    READ_SCRIPT,
    HistoryPage,
    Position,
    Script,
    parse_entries,
)
from channel_layer.stats import STATS, stats
from channel_layer.subscription import (
    RECONNECT_MAX,
    RECOVERY_GRACE,
    Shard,
)
from channel_layer.topology import PRIMARY, Node, SentinelTopology, make_topology
from channel_layer.transport import RedisAddress, RedisRedirect, RedisUnavailable, RespConnection

logger = logging.getLogger("switchboard.layer")

#: Seconds between two warnings about dropped messages (each says how many since the last).
DROP_LOG_SECONDS = 10.0
#: How long ``group_add`` and ``new_channel`` wait for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT = 5.0
#: Publishers a receiver keeps sequence numbers of, per channel (publishers restart).
MAX_PUBLISHERS_TRACKED = 1024
#: Channels a publisher keeps sequence numbers of; past this it forgets them all and continues
#: under a new sender id (receivers start afresh for it: no false gap, bounded memory).
MAX_CHANNELS_TRACKED = 100_000


@dataclasses.dataclass(frozen=True)
class Recording:
    """Where and how a recorded publish keeps its message (``channel_layer.history.APPEND``)."""

    keys: list[bytes]
    size: int
    ttl_ms: int

    def append_args(
        self, channel: bytes, header: bytes, payload: bytes, publish_command: str
    ) -> list[Any]:
        fresh_epoch = uuid.uuid4().hex[:12]
        return [
            *self.keys,
            channel,
            header,
            payload,
            self.size,
            self.ttl_ms,
            fresh_epoch,
            publish_command,
        ]


def _no_script(error: Exception) -> bool:
    """Whether an error reply says the server does not have the script (not executed)."""
    return "NOSCRIPT" in str(error)


#: A receiver's offer to take a message at once, in the layer's own callback, instead of being
#: woken for it (:meth:`FanoutChannelLayer.take_directly`): ``True`` when it took the message;
#: ``False`` (nothing done) hands it over the usual way. It must not change the message.
Taker = Callable[[dict[str, Any]], bool]


class _Mailbox:
    """One channel's bounded FIFO with at most one waiting receiver. Small on purpose (one per
    websocket): a message for a waiting receiver is handed over without being stored, or taken
    by the receiver's :data:`Taker` at once."""

    __slots__ = ("items", "stale", "taker", "waiter")

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] | None = None
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        self.taker: Taker | None = None
        self.stale = False  # see LoopState.sweep

    def put(self, message: dict[str, Any], capacity: int, shared: bool = False) -> bool:
        """Deliver or store; ``False`` when the oldest stored message had to make room.

        Only a receiver that is waiting -- nothing stored, nothing handed over and not yet
        received -- is offered the message through its taker, so the order stays the order of
        arrival. A ``shared`` message (one decoded group message, the same object for every
        member) is copied before it is handed over or stored: receivers may change theirs.
        """
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            taker = self.taker
            if taker is not None and taker(message):
                return True
            waiter.set_result(dict(message) if shared else message)
            self.waiter = None
            return True
        if shared:
            message = dict(message)
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


class LoopState:
    """Everything bound to one event loop: topology, connections, mailboxes, groups."""

    def __init__(self, layer: FanoutChannelLayer, loop: asyncio.AbstractEventLoop) -> None:
        self.layer = layer
        self.loop = loop
        self.token = uuid.uuid4().hex[:16]
        self.process_channel = layer.process_channel(self.token)
        self.topology = make_topology(
            layer.topology_kind,
            layer.address,
            layer.sentinels,
            layer.sentinel_master,
            **layer.sentinel_auth,
        )
        self.publish_command = "SPUBLISH" if self.topology.sharded else "PUBLISH"
        self.mailboxes: dict[str, _Mailbox] = {}
        self.groups: dict[str, set[str]] = {}  # group -> local channel names
        self.shards: dict[Node, Shard] = {}
        self.home: dict[bytes, Shard] = {}  # subscribed channel -> its shard
        self.publishers: dict[Node, RespConnection] = {}
        self.publisher_locks: dict[Node, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.watchdogs: dict[Node, asyncio.Task[None]] = {}
        self.connect_failed_at: dict[Node, float] = {}
        self.ready = asyncio.Event()
        self.started = False
        self.sent_seq: dict[bytes, int] = {}  # channel -> last sequence number published
        self.sender_epoch = 0
        self.sender_id = f"{self.token}.0".encode()  # in front of every message, with its number
        self.seen_seq: dict[bytes, dict[bytes, int]] = {}  # channel -> publisher -> last seen
        self.published_on: dict[bytes, Node] = {}  # cluster: channel -> node last published to
        self.settle_until: dict[bytes, float] = {}  # cluster: channel -> see publish()
        self.refreshing: asyncio.Task[None] | None = None

    # -- connections -----------------------------------------------------------------------------
    async def open_connection(
        self,
        node: Node,
        on_push: Callable[[Any], None] | None = None,
        address: RedisAddress | None = None,
    ) -> RespConnection:
        if address is None:
            address = await self.topology.address(node)
        connection = await RespConnection.open(address, on_push)
        if isinstance(self.topology, SentinelTopology):
            # Sentinel may still name a master that was just demoted (or not yet promoted).
            try:
                role = await connection.call(address.timeout, "ROLE")
            except BaseException:
                connection.close()
                raise
            if role[0] != b"master":
                connection.close()
                raise RedisUnavailable(f"{address.host}:{address.port} is not a master (yet)")
        return connection

    async def master_moved(self, connected_to: RedisAddress) -> bool:
        """Sentinel: whether the master is elsewhere now than ``connected_to`` (after a manual
        failover the old master keeps serving its clients until Sentinel demotes it, and a
        partitioned one forever). The publishing connection is closed too, so that the next
        publish goes to the new master."""
        if not isinstance(self.topology, SentinelTopology):
            return False
        try:
            now = await self.topology.address(PRIMARY)
        except RedisUnavailable:
            return False  # the sentinels are unreachable: keep what works
        if (now.host, now.port) == (connected_to.host, connected_to.port):
            return False
        publisher = self.publishers.get(PRIMARY)
        if publisher is not None:
            publisher.close()
        return True

    async def _publisher(self, node: Node) -> RespConnection:
        loop = self.loop
        async with self.publisher_locks[node]:
            connection = self.publishers.get(node)
            if connection is None or not connection.is_open:
                # Publishes queued behind a failed connect fail at once instead of each waiting
                # out connect_timeout in turn (a dead host does not refuse: it is silent).
                if loop.time() - self.connect_failed_at.get(node, float("-inf")) < RECONNECT_MAX:
                    raise RedisUnavailable(f"{self.topology.describe(node)} is unreachable")
                try:
                    connection = self.publishers[node] = await self.open_connection(node)
                except (RedisUnavailable, OSError):
                    self.connect_failed_at[node] = loop.time()
                    raise
                self.connect_failed_at.pop(node, None)
                old = self.watchdogs.get(node)
                if old is not None:
                    old.cancel()
                self.watchdogs[node] = self.loop.create_task(
                    connection.watch(self.layer.address.timeout)
                )
            return connection

    def refresh_soon(self) -> None:
        """Re-read the topology in the background (after a failed publish)."""
        if self.topology.sharded and (self.refreshing is None or self.refreshing.done()):
            self.refreshing = self.loop.create_task(self.topology.refresh())

    # -- publishing ------------------------------------------------------------------------------
    async def publish(
        self, channel: bytes, payload: bytes, recording: Recording | None = None
    ) -> Any:
        """PUBLISH (SPUBLISH) ``payload`` to ``channel``; answers the number of receivers. With a
        ``recording``, the message is appended to that history and published by one script
        (:mod:`channel_layer.history`), which answers ``[offset, epoch, receivers]``."""
        loop = self.loop
        if not self.topology.sharded:
            # While this process's own subscriptions are down, or other processes may still be
            # re-subscribing, a message could reach nobody: refuse it (the caller is told).
            shard = self.shards.get(PRIMARY)
            if shard is not None and (shard.down or loop.time() < shard.recovering_until):
                STATS.publish_failures += 1
                raise RedisUnavailable("channel layer: re-subscribing after an outage")
            return await self._publish_to(PRIMARY, channel, payload, recording=recording)
        try:
            await self.topology.start()
            node = self.topology.node_for(channel)
        except Exception as exc:
            STATS.publish_failures += 1
            self.refresh_soon()
            raise RedisUnavailable(f"channel layer: no owner for {channel!r}: {exc}") from exc
        await self._settle(channel, node)
        try:
            return await self._publish_to(node, channel, payload, recording=recording)
        except RedisRedirect:
            # Not executed: the slot moved. Follow it, give the subscribers the same time to
            # follow, and send it once more (a second redirect is a failure).
            STATS.redirects += 1
            await self.topology.refresh()
            node = self.topology.node_for(channel)
            await self._settle(channel, node)
            return await self._publish_to(node, channel, payload, resend=True, recording=recording)

    def _new_sender_id(self) -> None:
        self.sent_seq.clear()
        self.published_on.clear()
        self.sender_epoch += 1
        self.sender_id = f"{self.token}.{self.sender_epoch}".encode()

    async def _settle(self, channel: bytes, node: Node) -> None:
        """When a channel's owner changed since this process last published to it (failover,
        migration), the subscribers of other processes are moving too: wait RECOVERY_GRACE
        from the moment this process saw the change (a message sent sooner could reach no one)."""
        previous = self.published_on.get(channel)
        self.published_on[channel] = node
        if previous is not None and previous != node:
            self.settle_until[channel] = self.loop.time() + RECOVERY_GRACE
        until = self.settle_until.get(channel)
        if until is not None:
            remaining = until - self.loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
            else:
                del self.settle_until[channel]

    async def _publish_to(
        self,
        node: Node,
        channel: bytes,
        payload: bytes,
        *,
        resend: bool = False,
        recording: Recording | None = None,
    ) -> Any:
        try:
            connection = self.publishers.get(node)
            if connection is None or not connection.is_open:
                connection = await self._publisher(node)
            # Sequence numbers per channel let receivers count what never reached them.
            seq = self.sent_seq.get(channel)
            if seq is None:
                if len(self.sent_seq) >= MAX_CHANNELS_TRACKED:
                    self._new_sender_id()
                seq = 0
            seq += 1
            header = b"%s %d\n" % (self.sender_id, seq)
            if recording is None:
                reply = connection.request(self.publish_command, channel, header + payload)
            else:
                args = recording.append_args(channel, header, payload, self.publish_command)
                reply = connection.request("EVALSHA", APPEND_SCRIPT.sha, 2, *args)
            self.sent_seq[channel] = seq
            try:
                receivers = await reply
            except RedisUnavailable as exc:
                if recording is None or not _no_script(exc):
                    raise
                # Not executed (a restarted or new server): load the script, send it again.
                receivers = await connection.call(
                    self.layer.address.timeout, "EVAL", APPEND_SCRIPT.source, 2, *args
                )
        except RedisRedirect:
            if resend:
                STATS.publish_failures += 1
            if self.sent_seq.get(channel) == seq:
                self.sent_seq[channel] = seq - 1  # not delivered anywhere: no gap for receivers
            raise
        except (RedisUnavailable, OSError):
            STATS.publish_failures += 1
            self.refresh_soon()
            raise
        STATS.published += 1
        return receivers

    async def read(self, channel: bytes, script: Script, keys: list[bytes], *args: Any) -> Any:
        """Run a read-only ``script`` on the server that owns ``channel`` (one MOVED is
        followed)."""
        for attempt in (1, 2):
            try:
                await self.topology.start()
                node = self.topology.node_for(channel)
                connection = self.publishers.get(node)
                if connection is None or not connection.is_open:
                    connection = await self._publisher(node)
                timeout = self.layer.address.timeout
                try:
                    return await connection.call(
                        timeout, "EVALSHA", script.sha, len(keys), *keys, *args
                    )
                except RedisUnavailable as exc:
                    if not _no_script(exc):
                        raise
                    return await connection.call(
                        timeout, "EVAL", script.source, len(keys), *keys, *args
                    )
            except RedisRedirect:
                if attempt == 2:
                    raise
                await self.topology.refresh()
        raise AssertionError("unreachable")

    # -- subscribing -----------------------------------------------------------------------------
    def _shard(self, node: Node) -> Shard:
        shard = self.shards.get(node)
        if shard is None:
            shard = self.shards[node] = Shard(self, node)
        return shard

    async def start(self) -> None:
        if not self.started:
            await self.topology.start()
            if not self.started:
                self.started = True
                node = self.topology.node_for(self.process_channel)
                shard = self.home[self.process_channel] = self._shard(node)
                shard.add(self.process_channel)
        if self.ready.is_set():
            return  # (Python 3.11's wait_for would swallow a cancellation of a done wait)
        try:
            await asyncio.wait_for(self.ready.wait(), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise RedisUnavailable("channel layer: no subscription connection") from None

    async def subscribe(self, channel: bytes) -> None:
        await self.start()
        shard = self.home.get(channel)
        if shard is None:
            shard = self.home[channel] = self._shard(self.topology.node_for(channel))
        future = shard.add(channel)
        try:
            await asyncio.wait_for(asyncio.shield(future), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise RedisUnavailable("Redis did not confirm a subscription") from None

    def unsubscribe(self, channel: bytes) -> None:
        self.seen_seq.pop(channel, None)
        shard = self.home.pop(channel, None)
        if shard is not None:
            future = shard.remove(channel)
            if future is not None and not future.done():
                future.cancel()

    async def rehome(self, shard: Shard, channels: set[bytes], *, force: bool = False) -> None:
        """Re-read the cluster's slot map and move ``channels`` whose slot another node owns now
        to that node's shard (``force``: subscribe again those that stay where they are)."""
        await self.topology.refresh()
        moved: collections.Counter[str] = collections.Counter()
        for channel in channels:
            if channel not in shard.channels or self.home.get(channel) is not shard:
                continue
            try:
                node = self.topology.node_for(channel)
            except Exception as exc:  # slot not covered (yet): tried again on the next failure
                logger.warning("channel layer: %r has no owner yet (%s)", channel, exc)
                continue
            if node == shard.node:
                if force and shard.up and channel not in shard.subscribed:
                    shard.remove(channel, tell_node=False)
                    shard.add(channel)
                continue
            future = shard.remove(channel, tell_node=False)
            target = self.home[channel] = self._shard(node)
            target.add(channel, future)
            moved[self.topology.describe(node)] += 1
        if moved:
            STATS.rehomed += sum(moved.values())
            logger.warning(
                "channel layer: %d subscription(s) moved from %s to %s",
                sum(moved.values()),
                self.topology.describe(shard.node),
                ", ".join(f"{node} ({n})" for node, n in moved.items()),
            )

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

    # -- receiving -------------------------------------------------------------------------------
    def on_message(self, channel: bytes, data: bytes) -> None:
        STATS.received += 1
        layer = self.layer
        head, _, data = data.partition(b"\n")
        sender, _, seq = head.partition(b" ")
        try:
            self._check_sequence(channel, sender, int(seq))
        except ValueError:
            STATS.undeliverable += 1
            logger.warning("channel layer: a message without sequence number on %r", channel)
            return
        if channel == self.process_channel:
            name, _, payload = data.partition(b"\n")
            self._deliver(name.decode(), layer.deserialize(payload))
            return
        event = layer.deserialize(data)
        if channel.startswith(layer.group_prefix):
            for name in self.groups.get(channel[len(layer.group_prefix) : -1].decode(), ()):
                self._deliver(name, event, shared=True)
        else:
            self._deliver(channel[len(layer.named_prefix) : -1].decode(), event)

    def _check_sequence(self, channel: bytes, sender: bytes, seq: int) -> None:
        seen = self.seen_seq.get(channel)
        if seen is None:
            seen = self.seen_seq[channel] = {}
        last = seen.get(sender)
        if last is None or seq > last:
            if len(seen) > MAX_PUBLISHERS_TRACKED:
                seen.clear()  # publishers come and go (restarts): forget the old ones
            seen[sender] = seq
            if last is not None and seq > last + 1:
                self.layer.count_lost(channel, sender, seq - last - 1)

    def _deliver(self, name: str, message: dict[str, Any], shared: bool = False) -> None:
        mailbox = self.mailboxes.get(name)
        if mailbox is None:
            STATS.undeliverable += 1
            return
        STATS.delivered += 1
        if not mailbox.put(message, self.layer.capacity, shared):
            self.layer.count_drop(name)

    async def aclose(self) -> None:
        tasks = [shard.task for shard in self.shards.values()]
        tasks += [shard._rehoming for shard in self.shards.values()]
        tasks += [*self.watchdogs.values(), self.refreshing]
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for connection in [*self.publishers.values()]:
            connection.close()
        for shard in list(self.shards.values()):
            if shard.connection is not None:
                shard.connection.close()
        with contextlib.suppress(Exception):
            await self.topology.aclose()


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
        topology: str = "single",
        sentinels: str | Iterable[Any] = (),
        sentinel_master: str = "switchboard",
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(capacity=capacity, **kwargs)
        decoded = decode_hosts(hosts)
        if len(decoded) != 1:
            raise ValueError(
                "FanoutChannelLayer takes one Redis host: a server, the Sentinel master's "
                "credentials or a cluster seed node (topology= says which)"
            )
        self.address = RedisAddress.from_host(decoded[0])
        self.topology_kind = topology
        self.sentinels = sentinels if isinstance(sentinels, str) else list(sentinels)
        self.sentinel_master = sentinel_master
        self.sentinel_auth = {
            "sentinel_username": sentinel_username,
            "sentinel_password": sentinel_password,
        }
        make_topology(  # validates
            topology, self.address, self.sentinels, sentinel_master, **self.sentinel_auth
        )
        # Pub/sub ignores database numbers: the number goes into every channel name, with the
        # prefix, so that deployments sharing one Redis never see each other's messages. The
        # part in braces is the cluster hash tag: one group's channel is one slot (one shard),
        # and different groups spread over the shards.
        self.prefix = prefix
        self.namespace = f"{prefix}:{self.address.db}"
        self.group_prefix = f"{self.namespace}:g:{{".encode()
        self.history_prefix = f"{self.namespace}:h".encode()
        self.named_prefix = f"{self.namespace}:c:{{".encode()
        self._serializer = registry.get_serializer(
            serializer_format, symmetric_encryption_keys=symmetric_encryption_keys
        )
        # History scripts edit messages as MessagePack inside Redis.
        self._records = serializer_format == "msgpack" and not symmetric_encryption_keys
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = (
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
        return self.group_prefix + group.encode() + b"}"

    def named_channel(self, name: str) -> bytes:
        return self.named_prefix + name.encode() + b"}"

    def process_channel(self, token: str) -> bytes:
        return f"{self.namespace}:p:{{{token}}}".encode()

    def _state(self) -> LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = LoopState(self, loop)
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

    def count_lost(self, channel: bytes, sender: bytes, count: int) -> None:
        """Messages a publisher sent on ``channel`` that never reached this process (a
        failover or slot-migration gap): counted, and logged each time."""
        STATS.lost += count
        logger.warning(
            "channel layer: lost %d message(s) on %s from process %s (sent while this "
            "process's subscription was moving or down); %d lost since start",
            count,
            channel.decode(errors="replace"),
            sender.decode(errors="replace"),
            STATS.lost,
        )

    # -- channel layer API -------------------------------------------------------------------------
    async def new_channel(self, prefix: str = "specific.") -> str:
        state = self._state()
        await state.start()
        name = f"{prefix}{state.token}!{uuid.uuid4().hex[:12]}"
        state.mailboxes[name] = _Mailbox()
        return name

    def take_directly(self, channel: str, taker: Taker | None) -> bool:
        """Let ``taker`` take messages for ``channel`` (one of this process's, from
        :meth:`new_channel`) at once while its receiver waits (``None``: no more); ``False``
        when the channel is not this event loop's. A receiver woken for every message costs a
        task switch per delivery; a room's message to 1,000 members is 1,000 of them."""
        mailbox = self._state().mailboxes.get(channel)
        if mailbox is None:
            return False
        mailbox.taker = taker
        return True

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send to one channel: a process-specific one goes to its owner's process channel."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        payload = self.serialize(message)
        if "!" in channel:
            target = self.process_channel(channel.split("!", 1)[0].rsplit(".", 1)[-1])
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
            # Failed or cancelled: leave no subscription behind for a group nobody here is in.
            members.discard(channel)
            if not members and state.groups.get(group) is members:
                del state.groups[group]
                state.unsubscribe(self.group_channel(group))
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

    # -- history (channel_layer.history) ---------------------------------------------------------
    def history_keys(self, group: str) -> list[bytes]:
        """The group's stream and metadata keys: the channel's namespace and hash tag."""
        tag = group.encode() + b"}"
        return [self.history_prefix + b"s:{" + tag, self.history_prefix + b"m:{" + tag]

    async def group_send_recorded(
        self, group: str, message: dict[str, Any], *, size: int, ttl: float
    ) -> Position:
        """``group_send`` that also appends the message to the group's history, atomically:
        every member receives it with ``offset`` and ``epoch`` added, and a later
        :meth:`group_history` returns it with the same fields. Raises like ``group_send``."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        if not self._records:
            raise ValueError("history needs the msgpack serializer without encryption")
        recording = Recording(self.history_keys(group), size, int(ttl * 1000))
        reply = await self._state().publish(
            self.group_channel(group), self.serialize(message), recording
        )
        offset, epoch = reply[0], reply[1]
        return Position(int(offset), epoch.decode() if isinstance(epoch, bytes) else epoch)

    async def group_history(
        self,
        group: str,
        *,
        since: int | None = None,
        last: int | None = None,
        ttl: float,
    ) -> HistoryPage:
        """The group's epoch and latest offset, with every kept message after offset ``since``
        or the ``last`` N, oldest first (:meth:`HistoryPage.covers` says whether a resume is
        complete)."""
        mode, count = ("since", since) if since is not None else ("last", last)
        if count is None or count < 0:
            raise ValueError("group_history needs since >= 0 or last >= 0")
        epoch, offset, entries = await self._state().read(
            self.group_channel(group),
            READ_SCRIPT,
            self.history_keys(group),
            mode,
            count,
            int(ttl * 1000),
        )
        return HistoryPage(
            epoch.decode() if isinstance(epoch, bytes) else epoch,
            int(offset),
            parse_entries(entries, self.deserialize),
        )

    async def flush(self) -> None:
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.aclose()

    def stats(self) -> dict[str, int]:
        """This process's counters (see :class:`LayerStats`)."""
        return stats()
