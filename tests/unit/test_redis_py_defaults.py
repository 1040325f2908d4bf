"""redis-py 8's defaults versus channels-redis, on a real redis-server.

redis-py 8 reads with a 5 s socket timeout and caps a pool at 100 connections. channels-redis
blocks 5 s in BZPOPMIN while waiting for messages, so with the library defaults an idle
receive times out. The layer built from our settings must wait through idle periods.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio
from channels_redis.core import RedisChannelLayer

from config.channel_layers import LAYER_BLOCKING_POP_SECONDS, redis_connection_options


def test_installed_redis_py_is_the_major_version_we_guard_against() -> None:
    assert int(redis.__version__.split(".")[0]) >= 8, redis.__version__
    assert RedisChannelLayer.brpop_timeout == LAYER_BLOCKING_POP_SECONDS


def test_our_pool_options_override_the_risky_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    options = redis_connection_options()
    assert options["socket_timeout"] > LAYER_BLOCKING_POP_SECONDS
    assert options["max_connections"] >= 100
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT", "5")
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="must exceed"):
        redis_connection_options()


async def idle_then_receive(layer: RedisChannelLayer, idle: float) -> dict:
    channel = await layer.new_channel()

    async def late_send() -> None:
        await asyncio.sleep(idle)
        await layer.send(channel, {"type": "late", "n": 1})

    sender = asyncio.create_task(late_send())
    try:
        return await asyncio.wait_for(layer.receive(channel), idle + 10)
    finally:
        sender.cancel()
        await layer.flush()


async def test_library_defaults_break_an_idle_receive(redis_url: str) -> None:
    """Demonstrates the trap: the bare URL gets redis-py 8's 5 s read timeout."""
    layer = RedisChannelLayer(hosts=[redis_url], prefix="trap")
    started = time.monotonic()
    failed_after = None
    try:
        await idle_then_receive(layer, idle=12)
    except redis.exceptions.TimeoutError:
        failed_after = time.monotonic() - started
    # The receive died of the socket timeout while idle, long before the message came.
    assert failed_after is not None and failed_after < 12 + 1


async def test_our_layer_waits_through_an_idle_period(redis_url: str) -> None:
    layer = RedisChannelLayer(
        hosts=[{"address": redis_url, **redis_connection_options()}], prefix="guarded"
    )
    message = await idle_then_receive(layer, idle=12)
    assert message == {"type": "late", "n": 1}


async def test_a_burst_beyond_100_concurrent_commands_does_not_exhaust_the_pool(
    redis_url: str,
) -> None:
    layer = RedisChannelLayer(
        hosts=[{"address": redis_url, **redis_connection_options()}], prefix="burst"
    )
    channels = [await layer.new_channel() for _ in range(300)]
    for channel in channels:
        await layer.group_add("burst", channel)
    async with redis.asyncio.from_url(redis_url) as probe:
        clients_before = (await probe.info("clients"))["connected_clients"]
        results = await asyncio.gather(
            *(layer.group_send("burst", {"type": "x", "n": n}) for n in range(300)),
            return_exceptions=True,
        )
        # The stock pool keeps what the burst opened: more than redis-py 8's cap of 100.
        opened = (await probe.info("clients"))["connected_clients"] - clients_before
    try:
        assert [r for r in results if r is not None] == []
        assert opened > 100, opened
        # Every member got the group's messages (up to the channel capacity, 100).
        first, last = await layer.receive(channels[0]), await layer.receive(channels[-1])
        assert first["type"] == last["type"] == "x"
    finally:
        await layer.flush()
