"""CHANNEL_LAYERS from the environment, immune to redis-py 8's new defaults.

redis-py 8 changed two defaults that channels-redis inherits through ``ConnectionPool.from_url``:

* ``socket_timeout`` became 5 s (it was unbounded). ``RedisChannelLayer.receive`` blocks in
  ``BZPOPMIN`` for ``brpop_timeout`` = 5 s, so an idle socket's read and the socket timeout race
  and the receive loop dies with ``TimeoutError``: idle websockets get dropped.
* ``max_connections`` became 100 per pool (it was 2**31). Past that the asyncio pool raises
  ``MaxConnectionsError`` at once instead of queueing, so a burst of ``group_send`` fails.

Both are set explicitly here from REDIS_SOCKET_TIMEOUT and REDIS_MAX_CONNECTIONS, whatever redis-py
version is installed.

Two more options come from the fault tests (tests/faults/):

* A command that finds its pooled connection dead -- Redis restarted, the socket is stale --
  reconnects and retries (``retry``) instead of failing once per pooled connection.
* The ``redis`` backend is ``channel_layer.redis_core.RedisChannelLayer``: channels-redis with a
  pool that closes what a burst opened (REDIS_MAX_IDLE_CONNECTIONS) instead of keeping it forever.

The ``fanout`` backend is ``channel_layer.layer.FanoutChannelLayer`` (Redis pub/sub, groups
held per process, one decode per process, counted drops): see that module and
loadtests/README.md for what it buys. It alone follows REDIS_TOPOLOGY (``single``, ``sentinel``,
``cluster``: ``channel_layer.topology``) and names its channels from CHANNEL_PREFIX and the
database number of REDIS_URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from channel_layer.topology import TOPOLOGIES
from config import env

#: channels_redis.core.RedisChannelLayer.brpop_timeout
LAYER_BLOCKING_POP_SECONDS = 5

BACKENDS = {
    "redis": "channel_layer.redis_core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    "memory": "channels.layers.InMemoryChannelLayer",
    "fanout": "channel_layer.layer.FanoutChannelLayer",
}


def redis_connection_options() -> dict[str, Any]:
    """Keyword arguments for every Redis connection pool the app creates."""
    socket_timeout = env.get_float("REDIS_SOCKET_TIMEOUT", minimum=0.1)
    if socket_timeout <= LAYER_BLOCKING_POP_SECONDS:
        raise ImproperlyConfigured(
            f"REDIS_SOCKET_TIMEOUT={socket_timeout} must exceed the channel layer's "
            f"{LAYER_BLOCKING_POP_SECONDS} s blocking pop, or idle receives time out"
        )
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "max_connections": env.get_int("REDIS_MAX_CONNECTIONS", minimum=10),
        # Three quick retries (50, 100, 200 ms) on a fresh connection: enough to get past stale
        # pooled sockets, short enough that a real outage is reported at once. Retried
        # commands are safe: channels-redis adds messages as unique sorted-set members.
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 3),
    }


def channel_layers_from_env() -> dict[str, Any]:
    kind = env.get("CHANNEL_LAYER")
    try:
        backend = BACKENDS[kind]
    except KeyError:
        raise ImproperlyConfigured(
            f"CHANNEL_LAYER={kind!r}; expected one of {', '.join(BACKENDS)}"
        ) from None
    capacity = env.get_int("CHANNEL_CAPACITY", minimum=1)
    expiry = env.get_int("CHANNEL_EXPIRY", minimum=1)
    group_expiry = env.get_int("CHANNEL_GROUP_EXPIRY", minimum=60)
    if kind == "memory":
        config: dict[str, Any] = {
            "capacity": capacity,
            "expiry": expiry,
            "group_expiry": group_expiry,
        }
    else:
        host = {"address": env.get("REDIS_URL"), **redis_connection_options()}
        config = {"hosts": [host]}
        if kind == "redis":
            host["max_idle_connections"] = env.get_int("REDIS_MAX_IDLE_CONNECTIONS", minimum=1)
            config |= {"capacity": capacity, "expiry": expiry, "group_expiry": group_expiry}
        elif kind == "fanout":
            # Process-local groups: nothing to expire. Capacity bounds each consumer's mailbox.
            config |= {
                "capacity": capacity,
                "prefix": env.get("CHANNEL_PREFIX"),
                "topology": env.get("REDIS_TOPOLOGY"),
                "sentinels": env.get("REDIS_SENTINELS"),
                "sentinel_master": env.get("REDIS_SENTINEL_MASTER"),
                "sentinel_username": env.get("REDIS_SENTINEL_USERNAME"),
                "sentinel_password": env.get("REDIS_SENTINEL_PASSWORD"),
            }
    topology = env.get("REDIS_TOPOLOGY")
    if topology not in TOPOLOGIES:
        raise ImproperlyConfigured(
            f"REDIS_TOPOLOGY={topology!r}; expected one of {', '.join(TOPOLOGIES)}"
        )
    if topology != "single" and kind != "fanout":
        raise ImproperlyConfigured(
            f"REDIS_TOPOLOGY={topology} needs CHANNEL_LAYER=fanout (channels-redis' layers "
            "talk to one server)"
        )
    prefix = env.get("CHANNEL_PREFIX")
    if not prefix or any(c in prefix for c in "{}: \t\n"):
        raise ImproperlyConfigured(
            f"CHANNEL_PREFIX={prefix!r} must be non-empty, without braces (the cluster hash "
            "tag), colons or whitespace"
        )
    if topology == "sentinel" and not env.get_list("REDIS_SENTINELS"):
        raise ImproperlyConfigured("REDIS_TOPOLOGY=sentinel needs REDIS_SENTINELS (host:port,...)")
    if env.get("REDIS_SENTINEL_USERNAME") and not env.get("REDIS_SENTINEL_PASSWORD"):
        raise ImproperlyConfigured("REDIS_SENTINEL_USERNAME needs REDIS_SENTINEL_PASSWORD")
    return {"default": {"BACKEND": backend, "CONFIG": config}}


def app_redis_client(**overrides: Any) -> Any:
    """A redis-py asyncio client that follows REDIS_TOPOLOGY like the layer: the server, the
    Sentinel's master, or the cluster (probes use one of their own, with short timeouts)."""
    from channel_layer.topology import library_client

    return library_client(
        env.get("REDIS_TOPOLOGY"),
        env.get("REDIS_URL"),
        env.get("REDIS_SENTINELS"),
        env.get("REDIS_SENTINEL_MASTER"),
        sentinel_username=env.get("REDIS_SENTINEL_USERNAME"),
        sentinel_password=env.get("REDIS_SENTINEL_PASSWORD"),
        **(redis_connection_options() | overrides),
    )


#: Redis calls a worker process makes at once for the app's own keys (presence, per-user
#: connection counts). A connection storm (2,000 sockets in seconds) would otherwise open one
#: pooled connection per concurrent call -- hundreds per worker -- and redis-py's pool keeps
#: every one of them for the life of the process.
APP_REDIS_CONCURRENCY = 4


@dataclasses.dataclass
class AppRedis:
    """One event loop's client for the app's own keys, and the gate every call goes through."""

    client: Any
    gate: asyncio.Semaphore


_APP_REDIS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AppRedis] = (
    weakref.WeakKeyDictionary()
)


def app_redis() -> AppRedis:
    """This event loop's :class:`AppRedis` (``async with app.gate: await app.client...``)."""
    loop = asyncio.get_running_loop()
    app = _APP_REDIS.get(loop)
    if app is None:
        client = app_redis_client(max_connections=APP_REDIS_CONCURRENCY + 1)
        app = _APP_REDIS[loop] = AppRedis(client, asyncio.Semaphore(APP_REDIS_CONCURRENCY))
    return app
