"""channel_layer against a real redis-server: two layer objects stand for two processes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from channel_layer import layer as fanout_layer
from channel_layer import stats as layer_stats
from channel_layer.layer import FanoutChannelLayer
from channel_layer.topology import PRIMARY
from channel_layer.transport import RedisAddress, RedisUnavailable
from tests.redis_server import redis_server


@pytest.fixture
async def layers(redis_url: str) -> AsyncIterator[tuple[FanoutChannelLayer, FanoutChannelLayer]]:
    a = FanoutChannelLayer(hosts=[{"address": redis_url}], capacity=5)
    b = FanoutChannelLayer(hosts=[{"address": redis_url}], capacity=5)
    yield a, b
    await a.flush()
    await b.flush()


async def receive(layer: FanoutChannelLayer, channel: str) -> dict:
    return await asyncio.wait_for(layer.receive(channel), 2)


async def test_group_send_reaches_every_member_in_every_process(layers) -> None:
    a, b = layers
    ca, cb1, cb2 = await a.new_channel(), await b.new_channel(), await b.new_channel()
    for layer, channel in ((a, ca), (b, cb1), (b, cb2)):
        await layer.group_add("room", channel)
    await a.group_send("room", {"type": "chat.message", "text": "hi"})
    got = [await receive(a, ca), await receive(b, cb1), await receive(b, cb2)]
    assert all(m == {"type": "chat.message", "text": "hi"} for m in got)
    got[1]["text"] = "changed by one handler"
    assert got[2]["text"] == "hi"  # each member has its own copy


async def test_a_taker_gets_group_messages_while_its_receiver_waits_in_order(layers) -> None:
    a, b = layers
    cb = await b.new_channel()
    await b.group_add("room", cb)
    taken: list[dict] = []
    accept = True

    def take(message: dict) -> bool:
        if accept:
            taken.append(message)
        return accept

    assert b.take_directly(cb, take)
    assert not b.take_directly("specific.unknown!channel", take)
    # Nobody waits in receive: the message is stored, not offered (the order is kept).
    await a.group_send("room", {"type": "m", "n": 0})
    await asyncio.sleep(0.2)
    assert taken == []
    waiting = asyncio.ensure_future(b.receive(cb))
    assert (await asyncio.wait_for(waiting, 2))["n"] == 0
    # A receiver waiting: the taker takes it; the receive goes on waiting.
    waiting = asyncio.ensure_future(b.receive(cb))
    await asyncio.sleep(0)
    await a.group_send("room", {"type": "m", "n": 1})
    await asyncio.sleep(0.2)
    assert [m["n"] for m in taken] == [1] and not waiting.done()
    # Declined: handed to the receiver as usual, as a copy of its own.
    accept = False
    await a.group_send("room", {"type": "m", "n": 2})
    got = await asyncio.wait_for(waiting, 2)
    assert got == {"type": "m", "n": 2}
    # Unregistered: nothing is offered any more.
    accept = True
    assert b.take_directly(cb, None)
    waiting = asyncio.ensure_future(b.receive(cb))
    await asyncio.sleep(0)
    await a.group_send("room", {"type": "m", "n": 3})
    assert (await asyncio.wait_for(waiting, 2))["n"] == 3
    assert [m["n"] for m in taken] == [1]


async def test_send_to_a_channel_of_another_process_and_to_a_named_channel(layers) -> None:
    a, b = layers
    cb = await b.new_channel()
    await a.send(cb, {"type": "direct", "n": 1})
    assert await receive(b, cb) == {"type": "direct", "n": 1}
    waiting = asyncio.ensure_future(b.receive("jobs"))
    await asyncio.sleep(0.1)  # the named channel is subscribed on first receive
    await a.send("jobs", {"type": "job"})
    assert await asyncio.wait_for(waiting, 2) == {"type": "job"}


async def test_discarded_members_get_nothing_more(layers) -> None:
    a, b = layers
    ca, cb = await a.new_channel(), await b.new_channel()
    await a.group_add("g", ca)
    await b.group_add("g", cb)
    await b.group_discard("g", cb)
    await a.group_send("g", {"type": "x"})
    assert await receive(a, ca) == {"type": "x"}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(b.receive(cb), 0.3)


async def test_a_consumer_that_falls_behind_loses_its_oldest_messages_counted_and_logged(
    layers, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = layers
    cb = await b.new_channel()
    await b.group_add("slow", cb)
    before = b.stats()  # what /readyz shows, before and after
    b._drops_logged_at = -1e9  # this test wants the warning whatever logged before
    with caplog.at_level(logging.WARNING, logger="switchboard.layer"):
        for n in range(8):
            await a.group_send("slow", {"type": "m", "n": n})
        await asyncio.sleep(0.3)
    after = b.stats()
    assert after["dropped"] - before["dropped"] == 3
    assert after["delivered"] - before["delivered"] == 8
    assert after["lost"] == before["lost"]  # dropped for slowness, not lost in transit
    assert "more than 5 messages behind" in caplog.text
    assert [(await receive(b, cb))["n"] for _ in range(5)] == [3, 4, 5, 6, 7]


async def test_abandoned_mailboxes_are_swept(layers) -> None:
    a, _ = layers
    channel = await a.new_channel()
    await a.send(channel, {"type": "probe"})
    await receive(a, channel)  # a one-off round trip, like /readyz
    state = a._state()
    assert channel in state.mailboxes
    state.sweep()
    state.sweep()
    assert channel not in state.mailboxes


async def test_redis_outage_refuses_publishes_then_recovers(tmp_path: Path) -> None:
    with redis_server(tmp_path) as url:
        layer = FanoutChannelLayer(hosts=[{"address": url}])
        channel = await layer.new_channel()
        await layer.group_add("g", channel)
        state = layer._state()
        reconnects = layer_stats.STATS.reconnects
        # Break both connections, as a Redis restart does.
        state.shards[PRIMARY].connection.close()
        for publisher in state.publishers.values():
            publisher.close()
        await asyncio.sleep(0.05)
        assert layer_stats.STATS.reconnects == reconnects + 1
        with pytest.raises(RedisUnavailable):  # while re-subscribing: refused, not lost
            await layer.group_send("g", {"type": "m"})
        await asyncio.sleep(fanout_layer.RECONNECT_MAX + fanout_layer.RECOVERY_GRACE + 0.2)
        await layer.group_send("g", {"type": "m"})
        assert await asyncio.wait_for(layer.receive(channel), 2) == {"type": "m"}
        await layer.flush()


def numsub(redis_url: str, channel: bytes) -> int:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    return int(client.pubsub_numsub(channel)[0][1])


async def test_a_cancelled_group_add_leaves_no_subscription(layers, redis_url: str) -> None:
    a, _ = layers
    channel = await a.new_channel()
    joining = asyncio.ensure_future(a.group_add("abandoned", channel))
    await asyncio.sleep(0)  # SUBSCRIBE is on its way: cancel before Redis confirms it
    joining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joining
    await asyncio.sleep(0.2)
    assert "abandoned" not in a._state().groups
    assert numsub(redis_url, a.group_channel("abandoned")) == 0
    # A group_add that completes and a group_discard leave nothing either (the control).
    await a.group_add("kept", channel)
    assert numsub(redis_url, a.group_channel("kept")) == 1
    await a.group_discard("kept", channel)
    await asyncio.sleep(0.2)
    assert numsub(redis_url, a.group_channel("kept")) == 0


async def test_a_failed_group_add_leaves_no_subscription(
    layers, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = layers
    channel = await a.new_channel()
    monkeypatch.setattr(fanout_layer, "SUBSCRIBE_TIMEOUT", 0.5)
    shard = a._state().shards[PRIMARY]
    # A subscription Redis never confirms: its SUBSCRIBE is held back, so group_add times out.
    original, shard.subscribe_command = shard.subscribe_command, "PING"
    try:
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(a.group_add("unconfirmed", channel), 10)
    finally:
        shard.subscribe_command = original
    assert "unconfirmed" not in a._state().groups
    assert a.group_channel("unconfirmed") not in shard.channels
    await asyncio.sleep(0.2)
    assert numsub(redis_url, a.group_channel("unconfirmed")) == 0


async def test_error_replies_on_the_subscription_connection_are_logged_and_counted(
    layers, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = layers
    await a.new_channel()
    shard = a._state().shards[PRIMARY]
    before = a.stats()["redis_errors"]
    with caplog.at_level(logging.WARNING, logger="switchboard.layer"):
        shard.connection.write("GET", "not-allowed-while-subscribed")
        await asyncio.sleep(0.3)
    assert a.stats()["redis_errors"] == before + 1
    assert "error reply on the subscription connection" in caplog.text
    assert "only (P|S)SUBSCRIBE" in caplog.text or "allowed in this context" in caplog.text
    assert await shard.ping()  # the connection carries on


def test_the_address_repr_hides_the_password() -> None:
    address = RedisAddress.from_host({"address": "redis://:s3cret-pw@127.0.0.1:6379/2"})
    assert address.password == "s3cret-pw"
    assert address.db == 2
    assert "s3cret-pw" not in repr(address)
    assert "s3cret-pw" not in str(
        FanoutChannelLayer(hosts=[{"address": "redis://:s3cret-pw@h/0"}]).address
    )


async def test_deployments_sharing_one_redis_never_see_each_others_messages(
    redis_url: str,
) -> None:
    """Pub/sub ignores database numbers: the channel names carry them, with CHANNEL_PREFIX."""
    base = redis_url.rsplit("/", 1)[0]
    deployments = {
        "db0": FanoutChannelLayer(hosts=[{"address": f"{base}/0"}], prefix="switchboard"),
        "db1": FanoutChannelLayer(hosts=[{"address": f"{base}/1"}], prefix="switchboard"),
        "prefix-a": FanoutChannelLayer(hosts=[{"address": f"{base}/0"}], prefix="a"),
        "prefix-b": FanoutChannelLayer(hosts=[{"address": f"{base}/0"}], prefix="b"),
    }
    try:
        members = {}
        for name, layer in deployments.items():
            members[name] = await layer.new_channel()
            await layer.group_add("lobby", members[name])
            named = asyncio.ensure_future(layer.receive("jobs"))
            members[name + ":jobs"] = named
        await asyncio.sleep(0.2)  # the named channels are subscribed on first receive
        for name, layer in deployments.items():
            await layer.group_send("lobby", {"type": "chat", "from": name})
            await layer.send("jobs", {"type": "job", "from": name})
        for name, layer in deployments.items():
            got = [await asyncio.wait_for(layer.receive(members[name]), 2)]
            with pytest.raises(TimeoutError):  # nothing from the other deployments
                got.append(await asyncio.wait_for(layer.receive(members[name]), 0.5))
            assert got == [{"type": "chat", "from": name}]
            assert await asyncio.wait_for(members[name + ":jobs"], 2) == {
                "type": "job",
                "from": name,
            }
        # Process-specific channels too: another deployment's send reaches no one.
        before = layer_stats.stats()["undeliverable"]
        await deployments["db1"].send(members["db0"], {"type": "stray"})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(deployments["db0"].receive(members["db0"]), 0.5)
        assert layer_stats.stats()["undeliverable"] == before
    finally:
        for layer in deployments.values():
            await layer.flush()


async def test_publisher_bookkeeping_is_bounded_without_false_losses(
    layers, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = layers
    monkeypatch.setattr(fanout_layer, "MAX_CHANNELS_TRACKED", 3)
    cb = await b.new_channel()
    await b.group_add("bounded", cb)
    before = b.stats()["lost"]
    for n in range(4):
        await a.group_send("bounded", {"type": "m", "n": n})
        for other in range(3):  # other groups fill a's table: it starts again, under a new id
            await a.group_send(f"filler-{n}-{other}", {"type": "m"})
    got = [(await receive(b, cb))["n"] for _ in range(4)]
    assert got == [0, 1, 2, 3]
    assert len(a._state().sent_seq) <= 3
    assert a._state().sender_epoch >= 3
    assert b.stats()["lost"] == before
