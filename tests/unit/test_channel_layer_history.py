"""Group history (channel_layer.history) on a real redis-server and a real 6-node cluster.

Two layer objects stand for two worker processes: one records, the other is a member and reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from channel_layer.layer import FanoutChannelLayer
from infra.redis_topologies import LocalCluster
from tests.redis_topologies import cluster_fixture

cluster = cluster_fixture()

TTL = 3600.0


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[FanoutChannelLayer, FanoutChannelLayer]]:
    a = FanoutChannelLayer(hosts=[{"address": redis_url}])
    b = FanoutChannelLayer(hosts=[{"address": redis_url}])
    yield a, b
    await a.flush()
    await b.flush()


async def record(layer: FanoutChannelLayer, group: str, count: int, size: int = 200) -> list:
    return [
        await layer.group_send_recorded(
            group, {"type": "chat.message", "n": n, "text": f"m{n}"}, size=size, ttl=TTL
        )
        for n in range(count)
    ]


async def test_offsets_are_consecutive_published_with_the_message_and_kept(pair) -> None:
    a, b = pair
    channel = await b.new_channel()
    await b.group_add("hist-basic", channel)
    positions = await record(a, "hist-basic", 5)
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in positions}) == 1
    live = [await asyncio.wait_for(b.receive(channel), 5) for _ in range(5)]
    assert [(m["offset"], m["epoch"], m["n"]) for m in live] == [
        (p.offset, p.epoch, n) for n, p in enumerate(positions)
    ]

    page = await b.group_history("hist-basic", since=2, ttl=TTL)
    assert (page.epoch, page.offset) == (positions[0].epoch, 5)
    assert page.messages == live[2:]  # exactly what was published, fields and all
    assert page.covers(2)
    last = await b.group_history("hist-basic", last=2, ttl=TTL)
    assert [m["offset"] for m in last.messages] == [4, 5]
    assert (await b.group_history("hist-basic", since=5, ttl=TTL)).messages == []


async def test_a_trimmed_history_does_not_claim_to_cover_the_gap(pair) -> None:
    a, b = pair
    await record(a, "hist-trim", 8, size=5)
    page = await b.group_history("hist-trim", since=0, ttl=TTL)
    assert [m["offset"] for m in page.messages] == [4, 5, 6, 7, 8]
    assert not page.covers(0) and not page.covers(2)
    assert (await b.group_history("hist-trim", since=3, ttl=TTL)).covers(3)


async def test_lost_history_gets_a_new_epoch(pair, redis_url: str) -> None:
    a, b = pair
    (first,) = await record(a, "hist-lost", 1)
    client = redis.Redis.from_url(redis_url)
    client.delete(*a.history_keys("hist-lost"))  # as if Redis restarted empty
    client.script_flush()  # and forgot the scripts: NOSCRIPT is handled
    (again,) = await record(a, "hist-lost", 1)
    assert again.offset == 1 and again.epoch != first.epoch
    page = await b.group_history("hist-lost", since=0, ttl=TTL)
    assert page.epoch == again.epoch and page.covers(0)
    empty = await b.group_history("hist-never", since=0, ttl=TTL)
    assert (empty.epoch, empty.offset, empty.messages) == ("", 0, [])


async def test_history_is_per_deployment(redis_url: str) -> None:
    """Different prefixes (or database numbers) never share a history."""
    one = FanoutChannelLayer(hosts=[{"address": redis_url}], prefix="one")
    two = FanoutChannelLayer(hosts=[{"address": redis_url}], prefix="two")
    try:
        await record(one, "hist-shared", 3)
        page = await two.group_history("hist-shared", since=0, ttl=TTL)
        assert (page.epoch, page.messages) == ("", [])
    finally:
        await one.flush()
        await two.flush()


async def test_history_on_a_cluster_lives_on_the_groups_shard(cluster: LocalCluster) -> None:
    from redis.crc import key_slot

    a = FanoutChannelLayer(hosts=[{"address": cluster.url}], topology="cluster")
    b = FanoutChannelLayer(hosts=[{"address": cluster.url}], topology="cluster")
    try:
        groups = [f"hist-c{n}" for n in range(12)]
        owners = {cluster.owner_of(key_slot(a.group_channel(g))) for g in groups}
        assert len(owners) == 3, owners  # the rooms are spread over all three masters
        channel = await b.new_channel()
        for group in groups:
            assert {key_slot(k) for k in a.history_keys(group)} == {
                key_slot(a.group_channel(group))
            }
            await b.group_add(group, channel)
            await record(a, group, 3)
        received = [await asyncio.wait_for(b.receive(channel), 5) for _ in range(36)]
        assert sorted((m["n"], m["offset"]) for m in received) == sorted(
            (n, n + 1) for n in range(3) for _ in groups
        )
        for group in groups:
            page = await b.group_history(group, since=1, ttl=TTL)
            assert [m["offset"] for m in page.messages] == [2, 3] and page.covers(1)
    finally:
        await a.flush()
        await b.flush()


async def test_a_promoted_replica_starts_a_new_epoch(tmp_path) -> None:
    """Replication is asynchronous: a promoted replica may lack the last appends, so it must
    not go on numbering the old epoch (clients would see an offset twice, for two messages)."""
    from urllib.parse import urlsplit

    from tests.redis_server import redis_server

    for name in ("master", "replica"):
        (tmp_path / name).mkdir()
    with (
        redis_server(tmp_path / "master") as master_url,
        redis_server(tmp_path / "replica") as replica_url,
    ):
        master = urlsplit(master_url)
        replica_client = redis.Redis.from_url(replica_url)
        replica_client.config_set("masterauth", master.password)
        replica_client.replicaof(master.hostname, master.port)
        writer = FanoutChannelLayer(hosts=[{"address": master_url}])
        reader = FanoutChannelLayer(hosts=[{"address": replica_url}])
        try:
            positions = await record(writer, "hist-failover", 3)
            # The history reached the replica...
            for _ in range(100):
                if replica_client.exists(*writer.history_keys("hist-failover")) == 2:
                    break
                await asyncio.sleep(0.05)
            replica_client.replicaof("NO", "ONE")  # ... which is then promoted
            page = await reader.group_history("hist-failover", since=0, ttl=TTL)
            assert (page.epoch, page.messages) == ("", [])  # not served as if complete
            (after,) = await record(reader, "hist-failover", 1)
            assert after.offset == 1 and after.epoch != positions[0].epoch
        finally:
            await writer.flush()
            await reader.flush()
