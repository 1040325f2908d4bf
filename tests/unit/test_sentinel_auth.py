"""Sentinels with credentials of their own (REDIS_SENTINEL_USERNAME, REDIS_SENTINEL_PASSWORD).

A real Sentinel set whose sentinels let in one ACL user only, with a password that is not the
master's (the master requires its own, REDIS_URL's). The layer and the app's own clients (the
readiness PING, presence and connection counts: ``config.channel_layers.app_redis_client``),
configured from the environment as a replica is, find the master through the sentinels and
work; asked with the master's password instead (no Sentinel credentials) the layer is refused,
with an error that says the Sentinels refused the authentication.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from channel_layer.layer import FanoutChannelLayer
from channel_layer.transport import RedisUnavailable
from config.channel_layers import app_redis_client, channel_layers_from_env
from infra.redis_topologies import LocalSentinelSet


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinelSet]:
    """One set for the module: sentinels that let in ``switchboard-app`` only."""
    with LocalSentinelSet(
        tmp_path_factory.mktemp("sentinel-auth"), sentinel_username="switchboard-app"
    ).start() as running:
        assert running.sentinel_password != running.password
        yield running


@pytest.fixture
def environ(sentinel_set: LocalSentinelSet, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment a replica on this set gets (settings are read at call time)."""
    for name, value in sentinel_set.settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CHANNEL_LAYER", "fanout")
    return sentinel_set.settings


def layer_from_env() -> FanoutChannelLayer:
    config = channel_layers_from_env()["default"]["CONFIG"]
    return FanoutChannelLayer(**config)


async def round_trip(sender: FanoutChannelLayer, receiver: FanoutChannelLayer) -> dict[str, Any]:
    channel = await receiver.new_channel()
    await receiver.group_add("sentinel-auth", channel)
    await sender.group_send("sentinel-auth", {"type": "probe.message", "n": 1})
    return await asyncio.wait_for(receiver.receive(channel), 10)


async def test_the_layer_asks_the_sentinels_with_their_own_credentials(
    environ: dict[str, str],
) -> None:
    assert environ["REDIS_SENTINEL_USERNAME"] == "switchboard-app"
    sender, receiver = layer_from_env(), layer_from_env()
    try:
        message = await round_trip(sender, receiver)
        assert (message["type"], message["n"]) == ("probe.message", 1)
    finally:
        await sender.flush()
        await receiver.flush()


async def test_the_app_client_asks_the_sentinels_with_their_own_credentials(
    environ: dict[str, str], sentinel_set: LocalSentinelSet
) -> None:
    client = app_redis_client()
    try:
        assert await client.ping()
        assert (await client.info("server"))["tcp_port"] == sentinel_set.master_port()
    finally:
        await client.aclose()


async def test_asked_with_the_masters_password_the_layer_is_refused_saying_why(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Sentinel credentials the layer asks with the master's password (the fallback for
    Sentinels that share it): these sentinels refuse it, and the error says so (the app's
    client builds its Sentinel from the same ``sentinel_credentials``). Slow on purpose: redis-py
    retries each sentinel's connection before giving up (about 12 s here)."""
    monkeypatch.delenv("REDIS_SENTINEL_USERNAME")
    monkeypatch.delenv("REDIS_SENTINEL_PASSWORD")
    layer = layer_from_env()
    try:
        with pytest.raises(RedisUnavailable) as refused:
            await layer.group_send("sentinel-auth", {"type": "probe.message"})
    finally:
        await layer.flush()
    assert "Sentinel knows no master" in str(refused.value)
    assert "AuthenticationError" in str(refused.value), refused.value
    assert environ["REDIS_SENTINEL_PASSWORD"] not in str(refused.value), "a secret in an error"
