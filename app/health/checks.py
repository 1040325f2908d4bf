"""Readiness checks: Redis PING and a channel-layer round trip."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis
from channels.layers import get_channel_layer
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from config.channel_layers import app_redis_client

_redis: aioredis.Redis | aioredis.RedisCluster | None = None


def _client() -> aioredis.Redis | aioredis.RedisCluster:
    global _redis
    if _redis is None:
        options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        options["max_connections"] = 4
        # A probe reports the state now; retrying is the prober's business (and would make a
        # "Redis is down" answer slower than the prober's timeout).
        options["retry"] = Retry(NoBackoff(), 0)
        _redis = app_redis_client(**options)
    return _redis


async def _redis_ping() -> str:
    try:
        await _client().ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


async def _layer_round_trip() -> str:
    layer = get_channel_layer()
    if layer is None:
        return "no channel layer configured"
    token = uuid.uuid4().hex
    try:
        # The default prefix matters: channels-redis multiplexes every process-local channel of
        # one prefix through a single blocking pop. With a prefix of its own, this channel's
        # message waits in a Redis list nobody pops while consumers hold the receive loop.
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "readyz.probe", "token": token})
        message = await asyncio.wait_for(layer.receive(channel), 2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok" if message.get("token") == token else "round trip returned another message"


def layer_details() -> dict[str, int] | None:
    """The channel layer's own counters, when it keeps any (``channel_layer.layer`` does:
    messages published, delivered, dropped, reconnects...), for ``/readyz``."""
    layer = get_channel_layer()
    stats = getattr(layer, "stats", None)
    return stats() if callable(stats) else None


async def readiness() -> dict[str, str]:
    uses_redis = "InMemory" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]
    checks = {"channel_layer": await _layer_round_trip()}
    if uses_redis:
        checks["redis"] = await _redis_ping()
    return checks


async def bounded_readiness(seconds: float) -> dict[str, str]:
    """:func:`readiness`, with both checks run at once and each cut off after ``seconds``: for
    callers that must answer in time whatever Redis does (a Prometheus scrape)."""

    async def bounded(check: Any) -> str:
        try:
            return await asyncio.wait_for(check, seconds)
        except TimeoutError:
            return f"no answer within {seconds:g} s"

    uses_redis = "InMemory" not in settings.CHANNEL_LAYERS["default"]["BACKEND"]
    names = ["channel_layer", "redis"] if uses_redis else ["channel_layer"]
    checks = [_layer_round_trip(), _redis_ping()] if uses_redis else [_layer_round_trip()]
    results = await asyncio.gather(*(bounded(check) for check in checks))
    return dict(zip(names, results, strict=True))
