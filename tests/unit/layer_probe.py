"""What a channel layer holds for a group or a channel, asked of Redis and of the layer's
public counters -- for tests that check a consumer left nothing behind."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio

from channel_layer.layer import FanoutChannelLayer
from channel_layer.stats import stats


async def group_members_in_redis(layer: Any, redis_url: str, group: str) -> int:
    """channels-redis: the channels in the group's sorted set. fanout: the connections
    subscribed to the group's pub/sub channel (one per worker process with a member)."""
    async with redis.asyncio.from_url(redis_url) as client:
        if isinstance(layer, FanoutChannelLayer):
            [(_, count)] = await client.pubsub_numsub(layer.group_channel(group))
            return count
        return await client.zcard(layer._group_key(group))


async def messages_held_for(layer: Any, redis_url: str, channel: str) -> int:
    """Messages the layer holds for ``channel`` after one more is sent to it: fanout keeps them
    in the channel's mailbox (0 once the channel is forgotten: the probe is counted as
    undeliverable), channels-redis in a sorted set in Redis."""
    if not isinstance(layer, FanoutChannelLayer):
        async with redis.asyncio.from_url(redis_url) as client:
            return await client.zcard(layer.prefix + layer.non_local_name(channel))
    before = stats()
    await layer.send(channel, {"type": "probe"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = stats()
        if now["delivered"] > before["delivered"]:
            return now["delivered"] - before["delivered"]
        if now["undeliverable"] > before["undeliverable"]:
            return 0
        await asyncio.sleep(0.01)
    raise AssertionError("the probe sent to the channel never came back from Redis")
