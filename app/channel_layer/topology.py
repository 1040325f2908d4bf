"""Which Redis server(s) the layer talks to: one server, a Sentinel-managed master, or a Cluster.

The layer (``channel_layer.layer``) asks a topology two things: which *node* owns a Redis
channel (:meth:`Topology.node_for`) and where that node is right now (:meth:`Topology.address`);
after a failure it asks for a :meth:`Topology.refresh`. Everything that knows about slot maps,
redirects and failover discovery is redis-py's (``redis.asyncio.cluster.RedisCluster``'s slot
map, ``redis.asyncio.sentinel.Sentinel``'s master lookup): this module only adapts it.

=============  ===========================================================================
``single``     one server (``REDIS_URL``). Plain ``SUBSCRIBE`` / ``PUBLISH``.
``sentinel``   the master Sentinel names ``REDIS_SENTINEL_MASTER``, looked up on every
               (re)connect through ``REDIS_SENTINELS`` (asked with their own credentials,
               :func:`sentinel_credentials`); ``REDIS_URL`` gives the master's credentials,
               database and TLS (its host is ignored). Plain ``SUBSCRIBE`` / ``PUBLISH``.
``cluster``    a Redis Cluster (7.0+, or Valkey) seeded by ``REDIS_URL``. Sharded pub/sub
               (``SSUBSCRIBE`` / ``SPUBLISH``): a channel lives on the master owning its slot,
               and a message costs that one shard, not every node as ``PUBLISH`` would.
=============  ===========================================================================
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot

from channel_layer.transport import RedisAddress, RedisUnavailable

logger = logging.getLogger("switchboard.layer")

TOPOLOGIES = ("single", "sentinel", "cluster")

#: The node of a non-sharded topology: whatever server is the master right now.
PRIMARY = "primary"

#: A refresh asked for within this many seconds of the previous one reuses its result (every
#: connection of a failed node asks at once).
REFRESH_MIN_INTERVAL = 0.1

Node = str | tuple[str, int]


class Topology:
    """One server: ``node_for`` is always :data:`PRIMARY`, ``address`` always the same."""

    #: Use SSUBSCRIBE / SPUBLISH (channels live on the shard owning their slot).
    sharded = False
    #: The master may move while connected (Sentinel): ask again now and then.
    follows_failovers = False

    def __init__(self, address: RedisAddress) -> None:
        self.seed = address

    async def start(self) -> None:
        """Learn the topology (a no-op for one server)."""

    def node_for(self, channel: bytes) -> Node:
        return PRIMARY

    async def address(self, node: Node) -> RedisAddress:
        return self.seed

    async def refresh(self) -> None:
        """Re-learn the topology after a failure (a no-op for one server)."""

    async def aclose(self) -> None:
        """Close the library clients."""

    def describe(self, node: Node) -> str:
        return f"{self.seed.host}:{self.seed.port}" if self.seed.path is None else self.seed.path


def sentinel_credentials(
    username: str | None, password: str | None, master_password: str | None
) -> dict[str, str]:
    """What redis-py's ``Sentinel`` presents to the Sentinels (its ``sentinel_kwargs``): their
    own ``password`` (REDIS_SENTINEL_PASSWORD), as ``username`` (REDIS_SENTINEL_USERNAME) if
    given; without a password of their own, the master's, for Sentinels that share it."""
    if password:
        return {"username": username, "password": password} if username else {"password": password}
    if username:
        raise ValueError("REDIS_SENTINEL_USERNAME needs REDIS_SENTINEL_PASSWORD")
    return {} if master_password is None else {"password": master_password}


class SentinelTopology(Topology):
    """A master found through Sentinel, asked again on every (re)connect."""

    follows_failovers = True

    def __init__(
        self,
        address: RedisAddress,
        sentinels: Sequence[tuple[str, int]],
        master: str,
        *,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        super().__init__(address)
        if not sentinels:
            raise ValueError("REDIS_TOPOLOGY=sentinel needs REDIS_SENTINELS (host:port,...)")
        self.master = master
        self.current: tuple[str, int] | None = None
        options: dict[str, Any] = {
            "socket_timeout": address.connect_timeout,
            "socket_connect_timeout": address.connect_timeout,
            **sentinel_credentials(sentinel_username, sentinel_password, address.password),
        }
        if address.tls is not None:
            options["ssl"] = True
            options["ssl_cert_reqs"] = address.tls.verify_mode
            options["ssl_ca_certs"] = address.tls_ca_file
        self.sentinel = Sentinel(list(sentinels), sentinel_kwargs=options)

    async def address(self, node: Node) -> RedisAddress:
        try:
            host, port = await self.sentinel.discover_master(self.master)
        except Exception as exc:
            raise RedisUnavailable(f"Sentinel knows no master {self.master!r}: {exc}") from exc
        if self.current != (host, int(port)):
            if self.current is not None:
                logger.warning(
                    "channel layer: Sentinel master %r moved from %s:%d to %s:%s",
                    self.master,
                    *self.current,
                    host,
                    port,
                )
            self.current = (host, int(port))
        return dataclasses.replace(self.seed, host=host, port=int(port))

    async def aclose(self) -> None:
        await self.sentinel.aclose()

    def describe(self, node: Node) -> str:
        where = f"{self.current[0]}:{self.current[1]}" if self.current else "?"
        return f"sentinel master {self.master!r} ({where})"


class ClusterTopology(Topology):
    """A Redis Cluster: redis-py's slot map says which master owns a channel's slot."""

    sharded = True

    def __init__(self, address: RedisAddress) -> None:
        super().__init__(address)
        if address.path is not None:
            raise ValueError("REDIS_TOPOLOGY=cluster needs a redis:// or rediss:// seed node")
        options: dict[str, Any] = {
            "host": address.host,
            "port": address.port,
            "username": address.username,
            "password": address.password,
            "socket_timeout": address.timeout,
            "socket_connect_timeout": address.connect_timeout,
        }
        if address.tls is not None:
            options["ssl"] = True
            options["ssl_cert_reqs"] = address.tls.verify_mode
            options["ssl_check_hostname"] = address.tls.check_hostname
            options["ssl_ca_certs"] = address.tls_ca_file
        self.cluster = RedisCluster(**options)
        self._started = False
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        self._slots: dict[bytes, int] = {}

    async def start(self) -> None:
        if not self._started:
            try:
                await self.cluster.initialize()
            except Exception as exc:
                raise RedisUnavailable(f"cannot read the cluster's slot map: {exc}") from exc
            self._started = True

    def slot(self, channel: bytes) -> int:
        slot = self._slots.get(channel)
        if slot is None:
            if len(self._slots) > 100_000:
                self._slots.clear()
            slot = self._slots[channel] = key_slot(channel)
        return slot

    def node_for(self, channel: bytes) -> Node:
        node = self.cluster.nodes_manager.get_node_from_slot(self.slot(channel))
        return (node.host, node.port)

    async def address(self, node: Node) -> RedisAddress:
        host, port = node  # type: ignore[misc]
        return dataclasses.replace(self.seed, host=host, port=port)

    async def refresh(self) -> None:
        """Re-read the slot map (CLUSTER SLOTS from any reachable node). Callers that arrive
        while a refresh runs, or just after one, share it."""
        loop = asyncio.get_running_loop()
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        if loop.time() - self._refreshed_at < REFRESH_MIN_INTERVAL:
            return
        self._refreshing = loop.create_future()
        try:
            await self.cluster.nodes_manager.initialize()
            self._started = True
        except Exception as exc:
            logger.warning("channel layer: cannot refresh the cluster's slot map (%s)", exc)
        finally:
            self._refreshed_at = loop.time()
            self._refreshing.set_result(None)
            self._refreshing = None

    async def aclose(self) -> None:
        await self.cluster.aclose()

    def describe(self, node: Node) -> str:
        host, port = node  # type: ignore[misc]
        return f"{host}:{port}"


def parse_sentinels(value: str | Sequence[Any]) -> list[tuple[str, int]]:
    """``"h1:26379,h2:26379"`` (or a list of such strings or pairs) -> ``[("h1", 26379), ...]``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    sentinels = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"REDIS_SENTINELS: {item!r} is not host:port")
            sentinels.append((host.strip("[]"), int(port)))
        else:
            host, port = item
            sentinels.append((str(host), int(port)))
    return sentinels


def make_topology(
    kind: str,
    address: RedisAddress,
    sentinels: str | Sequence[Any] = (),
    sentinel_master: str = "switchboard",
    *,
    sentinel_username: str | None = None,
    sentinel_password: str | None = None,
) -> Topology:
    """The topology ``kind`` (one of :data:`TOPOLOGIES`) seeded by ``address``."""
    if kind == "single":
        return Topology(address)
    if kind == "sentinel":
        return SentinelTopology(
            address,
            parse_sentinels(sentinels),
            sentinel_master,
            sentinel_username=sentinel_username,
            sentinel_password=sentinel_password,
        )
    if kind == "cluster":
        return ClusterTopology(address)
    raise ValueError(f"REDIS_TOPOLOGY={kind!r}; expected one of {', '.join(TOPOLOGIES)}")


def library_client(
    kind: str,
    url: str,
    sentinels: str | Sequence[Any] = (),
    sentinel_master: str = "switchboard",
    *,
    sentinel_username: str | None = None,
    sentinel_password: str | None = None,
    **options: Any,
) -> Redis | RedisCluster:
    """A redis-py asyncio client of the topology ``kind`` (``/readyz``'s PING, the app's own
    keys): the server, the cluster (PING goes to every master) or the master Sentinel names
    right now (the Sentinels asked with :func:`sentinel_credentials`)."""
    if kind == "cluster":
        options.pop("health_check_interval", None)
        return RedisCluster.from_url(url, **options)
    if kind == "sentinel":
        master = parse_url(url)
        for key in ("host", "port", "path", "connection_class"):
            master.pop(key, None)
        if url.startswith("rediss://"):
            master["ssl"] = True  # SentinelManagedSSLConnection
        sentinel_options = {
            "socket_timeout": options.get("socket_timeout"),
            "socket_connect_timeout": options.get("socket_connect_timeout"),
            **sentinel_credentials(sentinel_username, sentinel_password, master.get("password")),
        }
        sentinel = Sentinel(parse_sentinels(sentinels), sentinel_kwargs=sentinel_options)
        return sentinel.master_for(sentinel_master, **(master | options))
    return Redis.from_url(url, **options)
